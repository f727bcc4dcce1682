package model

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// sharedDir is ../shared beside the repository: the real models, data and golden outputs.
var sharedDir = filepath.Join("..", "..", "shared")

func sharedPath(t testing.TB, rel string) string {
	t.Helper()
	p := filepath.Join(sharedDir, rel)
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("shared file missing (CI needs ../shared beside the repository): %v", err)
	}
	return p
}

type goldenLogits struct {
	InputIDs      []int                `json:"input_ids"`
	LogitsAt      map[string][]float64 `json:"logits_at"`
	Argmax        []int                `json:"argmax"`
	LogSumExp     []float64            `json:"logsumexp"`
	HiddenMeanAbs [][]float64          `json:"hidden_mean_abs"`
}

type goldenEval struct {
	Data    string  `json:"data"`
	SeqLen  int     `json:"seq_len"`
	PPL     float64 `json:"ppl"`
	Windows int     `json:"windows"`
}

type goldenFile struct {
	Logits []goldenLogits `json:"logits"`
	Eval   []goldenEval   `json:"eval"`
}

var goldenModels = []struct{ name, model, golden string }{
	{"tinystories-8L", "models/tinystories-8L", "golden/tinystories-8L.json"},
	{"stories260K", "models/stories260K/stories260K.bin", "golden/stories260K.json"},
}

func readGolden(t *testing.T, rel string) goldenFile {
	t.Helper()
	b, err := os.ReadFile(sharedPath(t, rel))
	if err != nil {
		t.Fatal(err)
	}
	var g goldenFile
	if err := json.Unmarshal(b, &g); err != nil {
		t.Fatal(err)
	}
	return g
}

// TestGoldenLogits checks the engine against PyTorch reference logits, argmax, logsumexp and
// per-layer hidden-state magnitudes within 1e-4 absolute.
func TestGoldenLogits(t *testing.T) {
	for _, gm := range goldenModels {
		t.Run(gm.name, func(t *testing.T) {
			m, err := Load(sharedPath(t, gm.model))
			if err != nil {
				t.Fatal(err)
			}
			g := readGolden(t, gm.golden)
			if len(g.Logits) == 0 {
				t.Fatal("golden file has no logits cases")
			}
			for ci, c := range g.Logits {
				ids := [][]int{c.InputIDs}
				layers := make([]int, m.Config.Layers+1)
				for l := range layers {
					layers[l] = l
				}
				hs := m.HiddenStates(ids, layers)
				logits := m.Forward(ids)
				const tol = 1e-4
				for l, want := range c.HiddenMeanAbs {
					for tpos, w := range want {
						row := hs[l].Row(tpos)
						var s float64
						for _, v := range row {
							s += math.Abs(float64(v))
						}
						if got := s / float64(len(row)); math.Abs(got-w) > tol {
							t.Errorf("case %d: hidden_mean_abs[%d][%d] = %.6f, want %.6f", ci, l, tpos, got, w)
						}
					}
				}
				for pos, want := range c.LogitsAt {
					p, _ := strconv.Atoi(pos)
					row := logits.Row(p)
					worst := 0.0
					for v, w := range want {
						worst = math.Max(worst, math.Abs(float64(row[v])-w))
					}
					if worst > tol {
						t.Errorf("case %d: logits at %d differ by up to %.2e", ci, p, worst)
					}
				}
				for pos := range c.InputIDs {
					row := logits.Row(pos)
					best := 0
					for v := range row {
						if row[v] > row[best] {
							best = v
						}
					}
					if best != c.Argmax[pos] {
						t.Errorf("case %d: argmax at %d = %d, want %d", ci, pos, best, c.Argmax[pos])
					}
					if got := logSumExp64(row); math.Abs(got-c.LogSumExp[pos]) > tol {
						t.Errorf("case %d: logsumexp at %d = %.6f, want %.6f", ci, pos, got, c.LogSumExp[pos])
					}
				}
			}
		})
	}
}

func logSumExp64(row []float32) float64 {
	mx := math.Inf(-1)
	for _, v := range row {
		mx = math.Max(mx, float64(v))
	}
	var s float64
	for _, v := range row {
		s += math.Exp(float64(v) - mx)
	}
	return mx + math.Log(s)
}

// TestGoldenPerplexity checks the windows protocol against the reference perplexities (0.1%).
func TestGoldenPerplexity(t *testing.T) {
	for _, gm := range goldenModels {
		t.Run(gm.name, func(t *testing.T) {
			modelPath := sharedPath(t, gm.model)
			m, err := Load(modelPath)
			if err != nil {
				t.Fatal(err)
			}
			g := readGolden(t, gm.golden)
			if len(g.Eval) == 0 {
				t.Fatal("golden file has no eval cases")
			}
			tok, err := LoadTokenizer(modelPath, m.Vocab)
			if err != nil && !errors.Is(err, ErrNoTokenizer) {
				t.Fatal(err)
			}
			for _, e := range g.Eval {
				if e.SeqLen != 256 || (testing.Short() && e.Windows > 100) {
					// The other cases repeat the protocol, and under -short (the pure-Go build)
					// the 510-window one is left to cmd/linearpatch's TestEvalGolden, which
					// runs every case through the CLI.
					continue
				}
				stream, err := ReadTokenStream(sharedPath(t, e.Data), tok, m.Vocab)
				if err != nil {
					t.Fatal(err)
				}
				w := Windows(stream, e.SeqLen, 0)
				res, err := m.EvalPerplexity(context.Background(), w, nil)
				if err != nil {
					t.Fatal(err)
				}
				if res.Windows != e.Windows {
					t.Errorf("%s seq-len %d: %d windows, want %d", e.Data, e.SeqLen, res.Windows, e.Windows)
				}
				if res.Tokens != e.Windows*(e.SeqLen-1) {
					t.Errorf("tokens = %d, want %d", res.Tokens, e.Windows*(e.SeqLen-1))
				}
				if rel := math.Abs(res.PPL-e.PPL) / e.PPL; rel > 1e-3 {
					t.Errorf("%s seq-len %d: ppl %.6f, want %.6f (rel %.2e)", e.Data, e.SeqLen, res.PPL, e.PPL, rel)
				} else {
					t.Logf("%s seq-len %d: ppl %.6f, golden %.6f (rel %.1e)", e.Data, e.SeqLen, res.PPL, e.PPL, rel)
				}
			}
		})
	}
}
