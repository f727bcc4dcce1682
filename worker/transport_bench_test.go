package worker

import (
	"context"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"linearpatch/shards"
)

// transportMeta is the record metadata of the engine benchmark's synthetic model: d = 1024,
// vocab 32000, float16 activations, top-k 50.
var transportMeta = shards.Meta{SchemaVersion: shards.SchemaVersion, RunID: "bench", Fingerprint: "bench",
	Start: 3, End: 5, Dim: 1024, K: 50, Vocab: 32000, ActDType: shards.Float16}

// transportMessages encodes n real activation messages of the largest chunk that fits
// maxPayload (as a teacher sends them) and returns them with the tokens of each.
func transportMessages(tb testing.TB, n, maxPayload int) ([][]byte, int) {
	tb.Helper()
	m := transportMeta
	T := shards.TokensPerChunk(m, maxPayload)
	if T < 1 {
		tb.Fatalf("no token fits max payload %d", maxPayload)
	}
	r := rand.New(rand.NewPCG(5, 5))
	logits := make([]float32, m.Vocab)
	msgs := make([][]byte, n)
	for i := range msgs {
		c := shards.Chunk{Window: i, Chunks: 1, InputIDs: make([]int32, T), XCut: make([]float32, T*m.Dim),
			TopKIdx: make([]int32, T*m.K), TopKProb: make([]float32, T*m.K)}
		for t := range T {
			c.InputIDs[t] = int32(r.IntN(m.Vocab))
			for v := range logits {
				logits[v] = float32(3 * r.NormFloat64())
			}
			logits[r.IntN(m.Vocab)] += 10
			shards.TopK(logits, m.K, c.TopKIdx[t*m.K:(t+1)*m.K], c.TopKProb[t*m.K:(t+1)*m.K])
		}
		for j := range c.XCut {
			c.XCut[j] = float32(r.NormFloat64())
		}
		b, err := shards.EncodeMessage(m, []shards.Chunk{c})
		if err != nil {
			tb.Fatal(err)
		}
		msgs[i] = b
	}
	return msgs, T
}

// BenchmarkTransport measures JetStream (embedded server, file store) for activation
// records of the d = 1024 synthetic model: each op is one full-size message (the largest
// chunk under the server's 1 MiB max_payload), published with the Publisher's async
// window and Flush, then — after all b.N are stored — consumed with Consume and acked
// (the last with AckSync). ns/op and MB/s are end to end (publish + consume); publish-MB/s
// and consume-MB/s time each half alone.
func BenchmarkTransport(b *testing.B) {
	ctx := b.Context()
	sctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	e, err := StartEmbedded(sctx, b.TempDir(), WithServerLogger(testLogger()), WithAllowAnonymous())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(e.Shutdown)
	nc, err := Connect(sctx, ConnOptions{URL: e.URL(), Name: "bench", Logger: testLogger()})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		b.Fatal(err)
	}
	names, err := NewNames("bench")
	if err != nil {
		b.Fatal(err)
	}
	if err := Setup(sctx, js, names, StreamConfig{}); err != nil {
		b.Fatal(err)
	}
	msgs, tokens := transportMessages(b, 4, MaxPayload(nc))
	size := len(msgs[0])
	b.SetBytes(int64(size))
	pub, err := NewPublisher(js)
	if err != nil {
		b.Fatal(err)
	}
	var bytes int64
	b.ResetTimer()
	began := time.Now()
	for i := 0; i < b.N; i++ {
		key := DataKey{Run: names.Run(), Phase: "cache", Shard: i / 64, Window: i, Chunk: 0}
		payload := msgs[i%len(msgs)]
		if err := pub.Publish(ctx, key.Subject(), MsgID(key), payload, nil); err != nil {
			b.Fatal(err)
		}
		bytes += int64(len(payload))
	}
	if err := pub.Flush(ctx); err != nil {
		b.Fatal(err)
	}
	pubTime := time.Since(began)
	if st := pub.Stats(); st.Stored != b.N {
		b.Fatalf("publisher stats %+v, want %d stored", st, b.N)
	}

	consBegan := time.Now()
	cctx, stop := context.WithCancel(ctx)
	defer stop()
	got := 0
	var gotBytes int64
	err = Consume(cctx, js, names, "bench", names.DataFilter("cache"), func(ctx context.Context, m Msg) error {
		got++
		gotBytes += int64(len(m.Data))
		if got == b.N {
			defer stop()
			return m.AckSync(ctx)
		}
		return m.Ack()
	})
	if err != nil {
		b.Fatal(err)
	}
	consTime := time.Since(consBegan)
	b.StopTimer()
	if got != b.N || gotBytes != bytes {
		b.Fatalf("consumed %d messages (%d B), published %d (%d B)", got, gotBytes, b.N, bytes)
	}
	mb := float64(bytes) / 1e6
	b.ReportMetric(float64(size), "msg-bytes")
	b.ReportMetric(float64(size)/float64(tokens), "wire-B/token")
	b.ReportMetric(mb/pubTime.Seconds(), "publish-MB/s")
	b.ReportMetric(mb/consTime.Seconds(), "consume-MB/s")
	b.ReportMetric(float64(b.N)/(pubTime+consTime).Seconds(), "msgs/s")
}
