package shards

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"linearpatch/model"
)

// The measurements of SCHEMA.md ("Measured size and error"): bytes per token of the shard
// files at each dtype and compression, and the top-k targets' bytes and KL error, on
// LM-like synthetic distributions (vocabulary 32000) and on the real tinystories-8L model.
// The targets (≤ 120 B/token, KL ≤ 1e-3 nats/token with zstd) are asserted.

const (
	targetTopKBytes = 120
	targetTopKKL    = 1e-3
	// wireChunk is the tokens per row of a d = 4096 float16 run at a 1 MB max_payload
	// (TokensPerChunk): the rows, hence the record batches, the cache files hold.
	wireChunk = 124
)

// fileBytes writes rows (split into chunk rows) as a shard file and returns its size.
func fileBytes(t *testing.T, m Meta, windows []Chunk, comp Compression) int64 {
	t.Helper()
	var rows []Chunk
	for _, w := range windows {
		rows = append(rows, SplitWindow(m, w, wireChunk)...)
	}
	fi, err := WriteShardFile(filepath.Join(t.TempDir(), "m.arrow"), m, rows, comp)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Bytes
}

// withDim returns copies of windows whose activations are dim wide (the first dim
// channels, or zeros when the windows are narrower).
func withDim(windows []Chunk, from, dim int, final bool) []Chunk {
	out := make([]Chunk, len(windows))
	for i, w := range windows {
		c := w
		T := w.Tokens()
		c.XCut = make([]float32, T*dim)
		c.XFinal = nil
		if final {
			c.XFinal = make([]float32, T*dim)
		}
		for t := range T {
			copy(c.XCut[t*dim:(t+1)*dim], w.XCut[t*from:t*from+min(dim, from)])
			if final {
				copy(c.XFinal[t*dim:(t+1)*dim], w.XFinal[t*from:t*from+min(dim, from)])
			}
		}
		out[i] = c
	}
	return out
}

func withoutTopK(windows []Chunk) []Chunk {
	out := make([]Chunk, len(windows))
	for i, w := range windows {
		out[i] = w
		out[i].TopKIdx, out[i].TopKProb = nil, nil
	}
	return out
}

// topKCost returns the bytes per token the top-k columns add to a shard file and the mean
// KL(exact ‖ decoded) per token.
func topKCost(t *testing.T, m Meta, windows []Chunk, comp Compression) (float64, float64) {
	t.Helper()
	m1 := m
	m1.Dim, m1.Final = 1, false
	small := withDim(windows, m.Dim, 1, false)
	noK := m1
	noK.K = 0
	tokens := 0
	for _, w := range windows {
		tokens += w.Tokens()
	}
	with := fileBytes(t, m1, small, comp)
	without := fileBytes(t, noK, withoutTopK(small), comp)
	// KL from a decoded file.
	var rows []Chunk
	for _, w := range small {
		rows = append(rows, SplitWindow(m1, w, wireChunk)...)
	}
	path := filepath.Join(t.TempDir(), "kl.arrow")
	fi, err := WriteShardFile(path, m1, rows, comp)
	if err != nil {
		t.Fatal(err)
	}
	got, err := ReadShardFile(path, m1, fi.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	var kl float64
	K := m.K
	for i := range rows {
		for tk := range rows[i].Tokens() {
			kl += topKKL(t, rows[i].TopKIdx[tk*K:(tk+1)*K], rows[i].TopKProb[tk*K:(tk+1)*K], got[i].TopKIdx[tk*K:(tk+1)*K], got[i].TopKProb[tk*K:(tk+1)*K])
		}
	}
	return float64(with-without) / float64(tokens), kl / float64(tokens)
}

// actCost returns the bytes per activation element of x_cut in a shard file: the growth
// from width 1 to width d, per token and channel.
func actCost(t *testing.T, m Meta, windows []Chunk, comp Compression) float64 {
	t.Helper()
	m1 := m
	m1.Dim, m1.K, m1.Final = 1, 0, false
	md := m
	md.K, md.Final = 0, false
	tokens := 0
	for _, w := range windows {
		tokens += w.Tokens()
	}
	wide := fileBytes(t, md, withoutTopK(withDim(windows, m.Dim, m.Dim, false)), comp)
	narrow := fileBytes(t, m1, withoutTopK(withDim(windows, m.Dim, 1, false)), comp)
	return float64(wide-narrow) / float64(tokens*(m.Dim-1))
}

type measurement struct {
	name string
	m    Meta
	win  []Chunk
}

func measure(t *testing.T, ms []measurement) {
	var report strings.Builder
	fmt.Fprintf(&report, "\n| data | comp | top-k B/token | KL nats/token | x_cut B/elem f16 | bf16 | f32 | whole file B/token (d=%s, f16) |\n|---|---|---|---|---|---|---|---|\n", "data's d")
	for _, ms := range ms {
		for _, comp := range []Compression{CompressZstd, CompressLZ4, CompressNone} {
			tb, kl := topKCost(t, ms.m, ms.win, comp)
			var acts [3]float64
			for i, dt := range []DType{Float16, BFloat16, Float32} {
				m := ms.m
				m.ActDType = dt
				acts[i] = actCost(t, m, ms.win, comp)
			}
			tokens := 0
			for _, w := range ms.win {
				tokens += w.Tokens()
			}
			whole := float64(fileBytes(t, ms.m, ms.win, comp)) / float64(tokens)
			fmt.Fprintf(&report, "| %s | %s | %.1f | %.2e | %.3f | %.3f | %.3f | %.0f |\n", ms.name, comp, tb, kl, acts[0], acts[1], acts[2], whole)
			if comp == CompressZstd && (tb > targetTopKBytes || kl > targetTopKKL) {
				t.Errorf("%s: top-k targets take %.1f B/token (target ≤ %d) with KL %.2e (target ≤ %g)", ms.name, tb, targetTopKBytes, kl, targetTopKKL)
			}
		}
	}
	t.Log(report.String())
}

func TestCacheSizeSynthetic(t *testing.T) {
	if testing.Short() {
		t.Skip("measures 4096 tokens over a 32000 vocabulary; skipped under -short")
	}
	r := rand.New(rand.NewPCG(50, 50))
	m := Meta{RunID: "measure", Fingerprint: "synthetic", Start: 2, End: 4, Dim: 128, K: 50, Vocab: 32000, ActDType: Float16}
	var win []Chunk
	for w := range 2 {
		win = append(win, randWindow(r, m, 0, w, 2048))
	}
	measure(t, []measurement{{"synthetic V=32000", m, win}})
}

func TestCacheSizeTinyStories(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the tinystories-8L model; skipped under -short")
	}
	// The shared models and data sit beside the repository (../shared from its root), as
	// for every other test; CI provides them, so a missing one fails the test.
	dir := filepath.Join("..", "..", "shared", "models", "tinystories-8L")
	data := filepath.Join("..", "..", "shared", "data", "tinystories", "valid.txt")
	for _, p := range []string{dir, data} {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("shared file missing (CI needs ../shared beside the repository): %v", err)
		}
	}
	mdl, err := model.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := model.LoadTokenizer(dir, mdl.Vocab)
	if err != nil {
		t.Fatal(err)
	}
	ids, err := model.ReadTokenStream(data, tok, mdl.Vocab)
	if err != nil {
		t.Fatal(err)
	}
	const T, windows, start = 256, 16, 3
	if len(ids) < T*windows {
		t.Fatalf("%d tokens of data", len(ids))
	}
	m := Meta{RunID: "measure", Fingerprint: "tinystories-8L", Start: start, End: start + 2, Dim: mdl.Dim, K: 50, Vocab: mdl.Vocab, ActDType: Float16, Final: false}
	var win []Chunk
	for w := range windows {
		seq := ids[w*T : (w+1)*T]
		hs := mdl.HiddenStates([][]int{seq}, []int{start})
		logits := mdl.Forward([][]int{seq})
		c := Chunk{Window: w, Chunks: 1, InputIDs: make([]int32, T), XCut: hs[start].Data,
			TopKIdx: make([]int32, T*m.K), TopKProb: make([]float32, T*m.K)}
		for i := range T {
			c.InputIDs[i] = int32(seq[i])
			TopK(logits.Data[i*logits.Cols:(i+1)*logits.Cols], m.K, c.TopKIdx[i*m.K:(i+1)*m.K], c.TopKProb[i*m.K:(i+1)*m.K])
		}
		win = append(win, c)
	}
	measure(t, []measurement{{fmt.Sprintf("tinystories-8L V=%d, X_%d", mdl.Vocab, start), m, win}})
}
