package patch

import (
	"context"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"testing"

	"linearpatch/model"
)

// sharedDir is the project's shared directory (models, data, golden files), beside the
// repository checkout.
var sharedDir = filepath.Join("..", "..", "shared")

// pruneGolden is the part of golden/*-prune.json these tests check.
type pruneGolden struct {
	NumPrune     int                `json:"num_prune"`
	SeqLen       int                `json:"seq_len"`
	CalibWindows int                `json:"calib_windows"`
	Cosine       []float64          `json:"cosine"`
	Start        int                `json:"start"`
	End          int                `json:"end"`
	ScaleFirst8  []float64          `json:"scale_first8"`
	Calib        string             `json:"calib"`
	Eval         string             `json:"eval"`
	EvalWindows  int                `json:"eval_windows"`
	PPL          map[string]float64 `json:"ppl"`
	Ridge        float64            `json:"lstsq_ridge"`
}

// TestGoldenPrune reproduces the reference block selection and rotate scales of the two
// shared models: cosine within 1e-4, the selected block exactly, s[:8] within 1e-4 relative.
func TestGoldenPrune(t *testing.T) {
	if testing.Short() {
		t.Skip("golden calibration runs the real models (~10 s); skipped under -short")
	}
	if _, err := os.Stat(sharedDir); err != nil {
		t.Fatalf("shared directory %s is missing: %v", sharedDir, err)
	}
	tests := []struct {
		name, model, golden string
		tokenizer           bool
		ppl                 bool // also check the pruned models' perplexity (cheap only for the small one)
	}{
		{"tinystories-8L", "models/tinystories-8L", "golden/tinystories-8L-prune.json", true, false},
		{"stories260K", "models/stories260K/stories260K.bin", "golden/stories260K-prune.json", false, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join(sharedDir, tc.golden))
			if err != nil {
				t.Fatal(err)
			}
			var g pruneGolden
			if err := json.Unmarshal(b, &g); err != nil {
				t.Fatal(err)
			}
			modelPath := filepath.Join(sharedDir, tc.model)
			m, err := model.Load(modelPath)
			if err != nil {
				t.Fatal(err)
			}
			var tok model.Tokenizer
			if tc.tokenizer {
				if tok, err = model.LoadTokenizer(modelPath, m.Vocab); err != nil {
					t.Fatal(err)
				}
			}
			stream, err := model.ReadTokenStream(filepath.Join(sharedDir, g.Calib), tok, m.Vocab)
			if err != nil {
				t.Fatal(err)
			}
			windows := model.Windows(stream, g.SeqLen, g.CalibWindows)
			if len(windows) != g.CalibWindows {
				t.Fatalf("%d calibration windows, want %d", len(windows), g.CalibWindows)
			}
			h, err := NewHadamard(m.Dim)
			if err != nil {
				t.Fatal(err)
			}
			st := NewStats(m.Config.Layers, m.Dim, g.NumPrune, g.SeqLen)
			opts := StatsOptions{NumPrune: g.NumPrune, Gram: GramCut, Start: g.Start}
			if err := Accumulate(context.Background(), m, h, windows, 0, opts, st, nil); err != nil {
				t.Fatal(err)
			}
			cos := st.Cosine()
			t.Logf("cosine %.6f", cos)
			if len(cos) != len(g.Cosine) {
				t.Fatalf("%d cosines, golden %d", len(cos), len(g.Cosine))
			}
			for i := range cos {
				if math.Abs(cos[i]-g.Cosine[i]) > 1e-4 {
					t.Errorf("cosine[%d] = %.6f, golden %.6f", i, cos[i], g.Cosine[i])
				}
			}
			start, err := Select(cos, m.Config.Layers, g.NumPrune, false)
			if err != nil || start != g.Start || start+g.NumPrune != g.End {
				t.Fatalf("Select = %d, %v; golden block [%d, %d)", start, err, g.Start, g.End)
			}
			_, s, err := Fit(st, h, start, MethodRotate, 0)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("rotate s[:8] %.6f", s[:8])
			for c, want := range g.ScaleFirst8 {
				if math.Abs(s[c]-want) > 1e-4*math.Abs(want) {
					t.Errorf("s[%d] = %.6f, golden %.6f", c, s[c], want)
				}
			}
			if !tc.ppl {
				for _, method := range []Method{MethodDiag, MethodLstsq} {
					if _, _, err := Fit(st, h, start, method, g.Ridge); err != nil {
						t.Errorf("%s: %v", method, err)
					}
				}
				return
			}
			evalStream, err := model.ReadTokenStream(filepath.Join(sharedDir, g.Eval), tok, m.Vocab)
			if err != nil {
				t.Fatal(err)
			}
			evalWindows := model.Windows(evalStream, g.SeqLen, g.EvalWindows)
			for _, method := range Methods {
				P, _, err := Fit(st, h, start, method, g.Ridge)
				if err != nil {
					t.Fatalf("%s: %v", method, err)
				}
				got, err := m.Pruned(start, start+g.NumPrune, P).EvalPerplexity(context.Background(), evalWindows, nil)
				if err != nil {
					t.Fatal(err)
				}
				want := g.PPL[string(method)]
				t.Logf("%s: ppl %.4f, golden %.4f", method, got.PPL, want)
				if math.Abs(got.PPL-want) > 1e-3*want {
					t.Errorf("%s: perplexity %.4f, golden %.4f (0.1%%)", method, got.PPL, want)
				}
			}
		})
	}
}
