package shards

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/apache/arrow/go/v17/arrow"
	"github.com/apache/arrow/go/v17/arrow/ipc"
)

func TestMessageRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 7))
	for _, dt := range []DType{Float16, BFloat16, Float32} {
		for _, final := range []bool{false, true} {
			for _, shape := range []struct{ dim, k, vocab int }{{16, 5, 1000}, {3, 0, 10}, {8, 7, 70000}, {1, 1, 1}} {
				m := testMeta(dt, shape.dim, shape.k, shape.vocab, final)
				t.Run(fmt.Sprintf("%s/final=%v/d%d_k%d_v%d", dt, final, shape.dim, shape.k, shape.vocab), func(t *testing.T) {
					rows := []Chunk{randWindow(r, m, 2, 40, 9), randWindow(r, m, 2, 41, 1)}
					rows[1].Chunk, rows[1].Chunks, rows[1].TokenLo = 2, 3, 17
					b, err := EncodeMessage(m, rows)
					if err != nil {
						t.Fatal(err)
					}
					got, err := DecodeMessage(b, m)
					if err != nil {
						t.Fatal(err)
					}
					equalRows(t, m, got, rows, 1e-3)
					gm, kind, err := MessageMeta(b)
					want := m
					want.SchemaVersion = SchemaVersion
					if err != nil || kind != kindChunks || gm != want {
						t.Fatalf("MessageMeta = %+v, %q, %v; want %+v", gm, kind, err, want)
					}
				})
			}
		}
	}
}

func TestMessageEmptyRows(t *testing.T) {
	m := testMeta(Float16, 4, 2, 100, false)
	b, err := EncodeMessage(m, nil)
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeMessage(b, m)
	if err != nil || len(got) != 0 {
		t.Fatalf("%d rows, %v", len(got), err)
	}
}

func TestSplitJoinWindow(t *testing.T) {
	r := rand.New(rand.NewPCG(8, 8))
	m := testMeta(BFloat16, 8, 4, 500, true)
	for _, T := range []int{1, 7, 64, 100} {
		for _, maxTokens := range []int{1, 3, 10, 1000} {
			whole := randWindow(r, m, 1, 9, T)
			whole.TokenLo = 5
			parts := SplitWindow(m, whole, maxTokens)
			if want := (T + maxTokens - 1) / maxTokens; len(parts) != want {
				t.Fatalf("T %d max %d: %d chunks, want %d", T, maxTokens, len(parts), want)
			}
			var decoded []Chunk
			for i, p := range parts {
				if p.Tokens() > maxTokens || p.Tokens() < parts[len(parts)-1].Tokens() || p.Tokens() > parts[0].Tokens() || p.Chunk != i {
					t.Fatalf("T %d max %d: chunk %d has %d tokens", T, maxTokens, i, p.Tokens())
				}
				b, err := EncodeMessage(m, []Chunk{p})
				if err != nil {
					t.Fatal(err)
				}
				rows, err := DecodeMessage(b, m)
				if err != nil {
					t.Fatal(err)
				}
				decoded = append(decoded, rows...)
			}
			r.Shuffle(len(decoded), func(i, j int) { decoded[i], decoded[j] = decoded[j], decoded[i] })
			joined, err := JoinWindow(m, decoded)
			if err != nil {
				t.Fatal(err)
			}
			equalRows(t, m, []Chunk{joined}, []Chunk{whole}, 1e-3)
			if len(decoded) > 1 {
				if _, err := JoinWindow(m, decoded[1:]); !errors.Is(err, ErrInvalid) {
					t.Fatalf("join of a partial window: %v", err)
				}
			}
		}
	}
}

func TestEncodeMessageInvalid(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 9))
	m := testMeta(Float16, 4, 3, 100, false)
	good := randWindow(r, m, 0, 0, 3)
	tests := []struct {
		name   string
		meta   func(*Meta)
		row    func(*Chunk)
		target error
	}{
		{"no fingerprint", func(m *Meta) { m.Fingerprint = "" }, nil, ErrInvalid},
		{"bad dtype", func(m *Meta) { m.ActDType = "int8" }, nil, ErrInvalid},
		{"k > vocab", func(m *Meta) { m.K = 101 }, nil, ErrInvalid},
		{"bad cut", func(m *Meta) { m.Start, m.End = 4, 4 }, nil, ErrInvalid},
		{"future version", func(m *Meta) { m.SchemaVersion = 2 }, nil, ErrInvalid},
		{"short x_cut", nil, func(c *Chunk) { c.XCut = c.XCut[1:] }, ErrInvalid},
		{"x_final without final", nil, func(c *Chunk) { c.XFinal = c.XCut }, ErrInvalid},
		{"no tokens", nil, func(c *Chunk) { *c = Chunk{Chunks: 1} }, ErrInvalid},
		{"chunk ≥ chunks", nil, func(c *Chunk) { c.Chunk = 1 }, ErrInvalid},
		{"id beyond vocab", nil, func(c *Chunk) { c.InputIDs[1] = 100 }, ErrInvalid},
		{"top-k id beyond vocab", nil, func(c *Chunk) { c.TopKIdx[4] = 100 }, ErrInvalid},
		{"float16 overflow", nil, func(c *Chunk) { c.XCut[5] = 1e5 }, ErrOverflow},
		{"NaN activation", nil, func(c *Chunk) { c.XCut[5] = float32(math.NaN()) }, ErrInvalid},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			mm := m
			row := good
			row.InputIDs, row.XCut, row.TopKIdx = slices.Clone(good.InputIDs), slices.Clone(good.XCut), slices.Clone(good.TopKIdx)
			if tc.meta != nil {
				tc.meta(&mm)
			}
			if tc.row != nil {
				tc.row(&row)
			}
			if _, err := EncodeMessage(mm, []Chunk{row}); !errors.Is(err, tc.target) {
				t.Fatalf("error %v, want %v", err, tc.target)
			}
		})
	}
}

// encodeWithMetadata encodes rows under m's schema with metadata key set to val.
func encodeWithMetadata(t *testing.T, m Meta, rows []Chunk, key, val string) []byte {
	t.Helper()
	s := chunkSchema(m)
	md := s.Metadata()
	keys, vals := slices.Clone(md.Keys()), slices.Clone(md.Values())
	if i := md.FindKey(key); i >= 0 {
		if val == "" {
			keys, vals = slices.Delete(keys, i, i+1), slices.Delete(vals, i, i+1)
		} else {
			vals[i] = val
		}
	}
	nmd := arrow.NewMetadata(keys, vals)
	s2 := arrow.NewSchema(s.Fields(), &nmd)
	rec, err := chunkRecord(m, s2, rows)
	if err != nil {
		t.Fatal(err)
	}
	defer rec.Release()
	var buf bytes.Buffer
	w := ipc.NewWriter(&buf, ipc.WithSchema(s2))
	if err := w.Write(rec); err != nil {
		t.Fatal(err)
	}
	w.Close()
	return buf.Bytes()
}

func TestDecodeMessageRejects(t *testing.T) {
	r := rand.New(rand.NewPCG(10, 10))
	m := testMeta(Float16, 8, 4, 300, false)
	rows := []Chunk{randWindow(r, m, 0, 3, 5)}
	good, err := EncodeMessage(m, rows)
	if err != nil {
		t.Fatal(err)
	}
	wants := map[string]func(*Meta){
		"fingerprint": func(m *Meta) { m.Fingerprint = "other" },
		"run id":      func(m *Meta) { m.RunID = "run-2" },
		"cut":         func(m *Meta) { m.End = 6 },
		"dim":         func(m *Meta) { m.Dim = 9 },
		"k":           func(m *Meta) { m.K = 5 },
		"vocabulary":  func(m *Meta) { m.Vocab = 301 },
		"dtype":       func(m *Meta) { m.ActDType = BFloat16 },
		"final":       func(m *Meta) { m.Final = true },
	}
	for name, f := range wants {
		w := m
		f(&w)
		if _, err := DecodeMessage(good, w); !errors.Is(err, ErrForeign) {
			t.Errorf("%s: %v, want ErrForeign", name, err)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
	for _, tc := range []struct {
		name, key, val string
		target         error
	}{
		{"version 2", keyVersion, "2", ErrVersion},
		{"no version", keyVersion, "", ErrVersion},
		{"other quantizer", keyTopK, "fp32", ErrVersion},
		{"stats kind", keyKind, kindStatsWindows, ErrForeign},
		{"bad dim", keyDim, "x", ErrCorrupt},
		{"dim of another schema", keyDim, "9", ErrCorrupt},
	} {
		b := encodeWithMetadata(t, m, rows, tc.key, tc.val)
		w := m
		if tc.key == keyDim && tc.val == "9" {
			w.Dim = 9 // the metadata claims 9, the fields hold 8
		}
		if _, err := DecodeMessage(b, w); !errors.Is(err, tc.target) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.target)
		}
	}
	// Truncations, garbage and a wrong CRC.
	for _, n := range []int{0, 1, 8, 100, len(good) / 2, len(good) - 9, len(good) - 1} {
		if _, err := DecodeMessage(good[:n], m); !errors.Is(err, ErrCorrupt) {
			t.Errorf("truncated to %d: %v", n, err)
		}
	}
	if _, err := DecodeMessage(append(slices.Clone(good), 0), m); !errors.Is(err, ErrCorrupt) {
		t.Errorf("trailing byte: %v", err)
	}
	if _, err := DecodeMessage([]byte("not an arrow message at all....."), m); !errors.Is(err, ErrCorrupt) {
		t.Errorf("garbage: %v", err)
	}
	if _, err := DecodeMessage(good, Meta{}); !errors.Is(err, ErrInvalid) {
		t.Errorf("invalid want: %v", err)
	}
}

// TestDecodeMessageByteFlips flips every byte of a message: the decoder must return an
// error wrapping one of its sentinels or rows identical to the original (a flip in
// padding), never other rows.
func TestDecodeMessageByteFlips(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 11))
	m := testMeta(Float16, 4, 3, 300, true)
	rows := []Chunk{randWindow(r, m, 1, 2, 3), randWindow(r, m, 1, 3, 2)}
	good, err := EncodeMessage(m, rows)
	if err != nil {
		t.Fatal(err)
	}
	want, err := DecodeMessage(good, m)
	if err != nil {
		t.Fatal(err)
	}
	counts := map[string]int{}
	for i := range good {
		b := slices.Clone(good)
		b[i] ^= byte(1 + r.IntN(255))
		got, err := DecodeMessage(b, m)
		switch {
		case errors.Is(err, ErrCorrupt):
			counts["corrupt"]++
		case errors.Is(err, ErrForeign):
			counts["foreign"]++
		case errors.Is(err, ErrVersion):
			counts["version"]++
		case err != nil:
			t.Fatalf("flip at %d: error %v wraps no sentinel", i, err)
		default:
			counts["unchanged"]++
			if !chunksIdentical(got, want) {
				t.Fatalf("flip at byte %d of %d decoded to different rows", i, len(good))
			}
		}
	}
	t.Logf("%d flips: %v", len(good), counts)
}

func chunksIdentical(a, b []Chunk) bool {
	if len(a) != len(b) {
		return false
	}
	bits := func(x []float32) []uint32 {
		out := make([]uint32, len(x))
		for i, v := range x {
			out[i] = math.Float32bits(v)
		}
		return out
	}
	for i := range a {
		x, y := &a[i], &b[i]
		if x.Key() != y.Key() || x.Chunks != y.Chunks || x.TokenLo != y.TokenLo || !slices.Equal(x.InputIDs, y.InputIDs) ||
			!slices.Equal(bits(x.XCut), bits(y.XCut)) || !slices.Equal(x.TopKIdx, y.TopKIdx) ||
			!slices.Equal(bits(x.TopKProb), bits(y.TopKProb)) || !slices.Equal(bits(x.XFinal), bits(y.XFinal)) {
			return false
		}
	}
	return true
}

func TestTokensPerChunk(t *testing.T) {
	if testing.Short() {
		t.Skip("encodes 16 MiB windows; skipped under -short")
	}
	r := rand.New(rand.NewPCG(12, 12))
	const maxPayload = 1 << 20 // a NATS server's default max_payload
	for _, tc := range []struct {
		dt    DType
		final bool
	}{{Float16, false}, {Float16, true}, {BFloat16, false}, {Float32, false}} {
		m := testMeta(tc.dt, 4096, 50, 32000, tc.final)
		n := TokensPerChunk(m, maxPayload)
		if n < 1 {
			t.Fatalf("%s: no token fits", tc.dt)
		}
		// One full window of 2048 tokens, split and encoded chunk by chunk.
		whole := Chunk{Shard: 0, Window: 0, Chunks: 1, InputIDs: make([]int32, 2048), XCut: make([]float32, 2048*4096),
			TopKIdx: make([]int32, 2048*50), TopKProb: make([]float32, 2048*50)}
		fillActs(r, whole.XCut, 4096)
		if tc.final {
			whole.XFinal = slices.Clone(whole.XCut)
		}
		for t := range 2048 {
			for j := range 50 {
				whole.TopKIdx[t*50+j] = int32(j * 600)
				whole.TopKProb[t*50+j] = 1.0 / 50
			}
		}
		parts := SplitWindow(m, whole, n)
		largest := 0
		for _, p := range parts {
			b, err := EncodeMessage(m, []Chunk{p})
			if err != nil {
				t.Fatal(err)
			}
			largest = max(largest, len(b))
			if len(b) > maxPayload-HeaderMargin {
				t.Fatalf("%s final=%v: a %d-token chunk encodes to %d bytes > %d", tc.dt, tc.final, p.Tokens(), len(b), maxPayload-HeaderMargin)
			}
		}
		// Exactly n tokens fit; n+1 would not (up to the padding slack).
		for _, tokens := range []int{n, n + 1} {
			one := Chunk{Chunks: 1, InputIDs: whole.InputIDs[:tokens], XCut: whole.XCut[:tokens*4096],
				TopKIdx: whole.TopKIdx[:tokens*50], TopKProb: whole.TopKProb[:tokens*50]}
			if tc.final {
				one.XFinal = whole.XFinal[:tokens*4096]
			}
			b, err := EncodeMessage(m, []Chunk{one})
			if err != nil {
				t.Fatal(err)
			}
			slack := 8 * len(chunkSchema(m).Fields())
			if fits := len(b) <= maxPayload-HeaderMargin; fits != (tokens == n) {
				t.Errorf("%s final=%v: %d tokens encode to %d bytes (limit %d)", tc.dt, tc.final, tokens, len(b), maxPayload-HeaderMargin)
			}
			if tokens == n+1 && len(b) <= maxPayload-HeaderMargin-slack {
				t.Errorf("%s final=%v: bound not tight", tc.dt, tc.final)
			}
			if tokens == n {
				largest = max(largest, len(b))
			}
		}
		t.Logf("%s final=%v: %d tokens per chunk, %d chunks per 2048-token window, largest message %d bytes", tc.dt, tc.final, n, len(parts), largest)
	}
	if n := TokensPerChunk(testMeta(Float32, 4096, 50, 32000, true), 16<<10); n != 0 {
		t.Errorf("16 KiB payload: %d tokens of 32 KiB each", n)
	}
}

func benchMessage(b *testing.B) (Meta, []Chunk, []byte) {
	r := rand.New(rand.NewPCG(13, 13))
	m := testMeta(Float16, 1024, 50, 32000, false)
	rows := []Chunk{randWindow(r, m, 0, 0, 512)}
	msg, err := EncodeMessage(m, rows)
	if err != nil {
		b.Fatal(err)
	}
	return m, rows, msg
}

func BenchmarkEncodeMessage(b *testing.B) {
	m, rows, msg := benchMessage(b)
	b.SetBytes(int64(len(msg)))
	b.ReportMetric(float64(len(msg)), "msg-bytes")
	for b.Loop() {
		if _, err := EncodeMessage(m, rows); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecodeMessage(b *testing.B) {
	m, _, msg := benchMessage(b)
	b.SetBytes(int64(len(msg)))
	for b.Loop() {
		if _, err := DecodeMessage(msg, m); err != nil {
			b.Fatal(err)
		}
	}
}
