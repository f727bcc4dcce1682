package patch

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"math/rand/v2"
	"reflect"
	"slices"
	"testing"

	"linearpatch/model"
)

// tinyConfig is the synthetic model the statistics tests run.
var tinyConfig = model.Config{Dim: 32, Layers: 4, Heads: 4, KVHeads: 2, FFN: 64, Vocab: 97}

func tinyModel(t *testing.T) (*model.Model, *Hadamard) {
	t.Helper()
	m, err := model.Synthetic(tinyConfig, 7)
	if err != nil {
		t.Fatal(err)
	}
	h, err := NewHadamard(m.Dim)
	if err != nil {
		t.Fatal(err)
	}
	return m, h
}

func randomWindows(rng *rand.Rand, count, seqLen, vocab int) [][]int {
	w := make([][]int, count)
	for i := range w {
		w[i] = make([]int, seqLen)
		for t := range w[i] {
			w[i][t] = rng.IntN(vocab)
		}
	}
	return w
}

func onePass(t *testing.T, m *model.Model, h *Hadamard, windows [][]int, first int, opts StatsOptions) *Stats {
	t.Helper()
	st := NewStats(m.Config.Layers, m.Dim, opts.NumPrune, len(windows[0]))
	if err := Accumulate(context.Background(), m, h, windows, first, opts, st, nil); err != nil {
		t.Fatal(err)
	}
	return st
}

// relGramDiff returns max |a−b| / max |a| over the Gram sums of a and b, failing when their
// keys or token counts differ.
func relGramDiff(t *testing.T, a, b *Stats) float64 {
	t.Helper()
	if !reflect.DeepEqual(gramKeys(a.Gram), gramKeys(b.Gram)) {
		t.Fatalf("Gram keys %v vs %v", gramKeys(a.Gram), gramKeys(b.Gram))
	}
	worst := 0.0
	for i, ga := range a.Gram {
		gb := b.Gram[i]
		if ga.Tokens != gb.Tokens || ga.Start != gb.Start {
			t.Fatalf("Gram %d: start/tokens %d/%d vs %d/%d", i, ga.Start, ga.Tokens, gb.Start, gb.Tokens)
		}
		for _, pair := range [][2][]float64{{ga.XtX, gb.XtX}, {ga.XtY, gb.XtY}} {
			scale, diff := 0.0, 0.0
			for k, v := range pair[0] {
				scale = math.Max(scale, math.Abs(v))
				diff = math.Max(diff, math.Abs(v-pair[1][k]))
			}
			if scale == 0 {
				t.Fatalf("Gram %d is all zero", i)
			}
			worst = math.Max(worst, diff/scale)
		}
	}
	return worst
}

func TestMergeSplitsEqualOnePass(t *testing.T) {
	m, h := tinyModel(t)
	rng := rand.New(rand.NewPCG(1, 2))
	const seqLen = 256 // 8 windows per forward: splits cross batch boundaries
	windows := randomWindows(rng, 19, seqLen, m.Vocab)
	for _, opts := range []StatsOptions{
		{NumPrune: 1, Gram: GramAll},
		{NumPrune: 2, Gram: GramCut, Start: 1},
		{NumPrune: 3, Gram: GramNone},
	} {
		want := onePass(t, m, h, windows, 0, opts)
		if len(want.Windows) != len(windows) {
			t.Fatalf("one pass holds %d windows, want %d", len(want.Windows), len(windows))
		}
		wantCos := want.Cosine()
		for k := 1; k <= 4; k++ {
			// k parts at random split points, accumulated separately and merged out of order.
			cuts := []int{0, len(windows)}
			for len(cuts) < k+1 {
				c := 1 + rng.IntN(len(windows)-1)
				if !slices.Contains(cuts, c) {
					cuts = append(cuts, c)
				}
			}
			slices.Sort(cuts)
			parts := make([]*Stats, k)
			for p := range parts {
				parts[p] = onePass(t, m, h, windows[cuts[p]:cuts[p+1]], cuts[p], opts)
			}
			rng.Shuffle(len(parts), func(a, b int) { parts[a], parts[b] = parts[b], parts[a] })
			if k >= 3 { // pairwise first: a tree of merges as well as a chain (associativity)
				var paired []*Stats
				for p := 0; p < len(parts); p += 2 {
					if p+1 < len(parts) {
						if err := parts[p].Merge(parts[p+1]); err != nil {
							t.Fatal(err)
						}
					}
					paired = append(paired, parts[p])
				}
				parts = paired
			}
			got := NewStats(m.Config.Layers, m.Dim, opts.NumPrune, seqLen)
			for _, p := range parts {
				if err := got.Merge(p); err != nil {
					t.Fatalf("k=%d cuts %v: %v", k, cuts, err)
				}
			}
			if len(got.Windows) != len(windows) {
				t.Fatalf("k=%d: merged %d windows, want %d", k, len(got.Windows), len(windows))
			}
			if !reflect.DeepEqual(got.Windows, want.Windows) {
				for w := range got.Windows {
					if !reflect.DeepEqual(got.Windows[w], want.Windows[w]) {
						t.Fatalf("n=%d k=%d cuts %v: window %d differs from the one pass", opts.NumPrune, k, cuts, w)
					}
				}
			}
			if gc := got.Cosine(); !reflect.DeepEqual(gc, wantCos) {
				t.Fatalf("n=%d k=%d cuts %v: cosine %v, one pass %v", opts.NumPrune, k, cuts, gc, wantCos)
			}
			if opts.Gram != GramNone {
				if rel := relGramDiff(t, want, got); rel > 1e-12 {
					t.Fatalf("n=%d k=%d cuts %v: Gram differs by %g relative", opts.NumPrune, k, cuts, rel)
				}
			}
		}
	}
}

// TestAccumulateNaive checks every statistic against a direct computation from
// HiddenStates, one window at a time, with the dense Hadamard matrix.
func TestAccumulateNaive(t *testing.T) {
	m, h := tinyModel(t)
	rng := rand.New(rand.NewPCG(3, 4))
	const seqLen, n, first = 24, 2, 5
	windows := randomWindows(rng, 5, seqLen, m.Vocab)
	var dones []int
	st := NewStats(m.Config.Layers, m.Dim, n, seqLen)
	err := Accumulate(context.Background(), m, h, windows, first, StatsOptions{NumPrune: n, Gram: GramAll}, st,
		func(done int) { dones = append(dones, done) })
	if err != nil {
		t.Fatal(err)
	}
	if len(dones) == 0 || dones[len(dones)-1] != len(windows) {
		t.Fatalf("progress reported %v, want a last call with %d", dones, len(windows))
	}
	L, d := m.Config.Layers, m.Dim
	H := h.Dense()
	layers := make([]int, L+1)
	for l := range layers {
		layers[l] = l
	}
	const tol = 1e-5
	check := func(what string, got, want float64) {
		t.Helper()
		if math.Abs(got-want) > tol*math.Max(1, math.Abs(want)) {
			t.Fatalf("%s: got %.9g, want %.9g", what, got, want)
		}
	}
	xtx := make(map[int][]float64)
	xty := make(map[int][]float64)
	for i := 0; i <= L-n; i++ {
		xtx[i], xty[i] = make([]float64, d*d), make([]float64, d*d)
	}
	for w, ids := range windows {
		ws := st.Windows[w]
		if ws.Index != first+w || ws.Tokens != seqLen {
			t.Fatalf("window %d: index %d tokens %d", w, ws.Index, ws.Tokens)
		}
		hs := m.HiddenStates([][]int{ids}, layers)
		for l := 0; l <= L; l++ {
			for c := range d {
				var abs, rabs float64
				for tk := range seqLen {
					row := hs[l].Row(tk)
					abs += math.Abs(float64(row[c]))
					var y float64
					for k := range d {
						y += float64(row[k]) * H[k*d+c]
					}
					rabs += math.Abs(y)
				}
				check("AbsMean", ws.AbsMean[l][c], abs/seqLen)
				check("RotAbsMean", ws.RotAbsMean[l][c], rabs/seqLen)
			}
		}
		for i := 0; i <= L-n; i++ {
			var cs float64
			for tk := range seqLen {
				a, b := hs[i].Row(tk), hs[i+n].Row(tk)
				var dot, na, nb float64
				for k := range d {
					dot += float64(a[k]) * float64(b[k])
					na += float64(a[k]) * float64(a[k])
					nb += float64(b[k]) * float64(b[k])
				}
				cs += dot / math.Sqrt(na*nb)
				for r := range d {
					for c := range d {
						xtx[i][r*d+c] += float64(a[r]) * float64(a[c])
						xty[i][r*d+c] += float64(a[r]) * float64(b[c])
					}
				}
			}
			check("CosSum", ws.CosSum[i], cs)
		}
	}
	if len(st.Gram) != L-n+1 {
		t.Fatalf("GramAll collected %d starts, want %d", len(st.Gram), L-n+1)
	}
	for i, g := range st.Gram {
		if g.Tokens != int64(len(windows)*seqLen) {
			t.Fatalf("Gram %d: %d tokens", i, g.Tokens)
		}
		for k := range g.XtX {
			check("XtX", g.XtX[k], xtx[i][k])
			check("XtY", g.XtY[k], xty[i][k])
		}
	}
	cos := st.Cosine()
	for i := range cos {
		var sum float64
		for _, ws := range st.Windows {
			sum += ws.CosSum[i]
		}
		if cos[i] != sum/float64(len(windows)*seqLen) || cos[i] <= -1 || cos[i] >= 1 {
			t.Fatalf("Cosine()[%d] = %v, want %v", i, cos[i], sum/float64(len(windows)*seqLen))
		}
	}
}

func TestStatsJSONRoundTrip(t *testing.T) {
	m, h := tinyModel(t)
	rng := rand.New(rand.NewPCG(5, 6))
	st := onePass(t, m, h, randomWindows(rng, 3, 16, m.Vocab), 2, StatsOptions{NumPrune: 1, Gram: GramCut, Start: 2})
	b, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	var back Stats
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if err := back.Validate(); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(&back, st) {
		t.Fatal("Stats changed through JSON")
	}
}

func TestMergeErrors(t *testing.T) {
	m, h := tinyModel(t)
	rng := rand.New(rand.NewPCG(7, 8))
	windows := randomWindows(rng, 4, 16, m.Vocab)
	base := func() *Stats {
		return onePass(t, m, h, windows[:2], 0, StatsOptions{NumPrune: 1, Gram: GramCut, Start: 1})
	}
	tests := []struct {
		name  string
		other func() *Stats
	}{
		{"duplicate index", func() *Stats {
			return onePass(t, m, h, windows[1:3], 1, StatsOptions{NumPrune: 1, Gram: GramCut, Start: 1})
		}},
		{"other Gram start", func() *Stats {
			return onePass(t, m, h, windows[2:], 2, StatsOptions{NumPrune: 1, Gram: GramCut, Start: 2})
		}},
		{"no Gram", func() *Stats {
			return onePass(t, m, h, windows[2:], 2, StatsOptions{NumPrune: 1})
		}},
		{"other NumPrune", func() *Stats {
			return onePass(t, m, h, windows[2:], 2, StatsOptions{NumPrune: 2, Gram: GramCut, Start: 1})
		}},
		{"other SeqLen", func() *Stats {
			return onePass(t, m, h, randomWindows(rng, 2, 8, m.Vocab), 2, StatsOptions{NumPrune: 1, Gram: GramCut, Start: 1})
		}},
		{"malformed window", func() *Stats {
			o := onePass(t, m, h, windows[2:], 2, StatsOptions{NumPrune: 1, Gram: GramCut, Start: 1})
			o.Windows[1].AbsMean[3] = o.Windows[1].AbsMean[3][:5]
			return o
		}},
		{"unsorted windows", func() *Stats {
			o := onePass(t, m, h, windows[2:], 2, StatsOptions{NumPrune: 1, Gram: GramCut, Start: 1})
			o.Windows[0], o.Windows[1] = o.Windows[1], o.Windows[0]
			return o
		}},
		{"Gram token count", func() *Stats {
			o := onePass(t, m, h, windows[2:], 2, StatsOptions{NumPrune: 1, Gram: GramCut, Start: 1})
			o.Gram[1].Tokens++
			return o
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := base()
			before, _ := json.Marshal(s)
			err := s.Merge(tc.other())
			if !errors.Is(err, ErrStats) {
				t.Fatalf("Merge: %v, want ErrStats", err)
			}
			after, _ := json.Marshal(s)
			if string(before) != string(after) {
				t.Fatal("a failed Merge changed the receiver")
			}
		})
	}
	t.Run("empty other is neutral", func(t *testing.T) {
		s := base()
		before, _ := json.Marshal(s)
		if err := s.Merge(NewStats(s.Layers, s.Dim, s.NumPrune, s.SeqLen)); err != nil {
			t.Fatal(err)
		}
		after, _ := json.Marshal(s)
		if string(before) != string(after) {
			t.Fatal("merging empty statistics changed the receiver")
		}
	})
}

func TestAccumulateErrors(t *testing.T) {
	m, h := tinyModel(t)
	rng := rand.New(rand.NewPCG(9, 10))
	windows := randomWindows(rng, 3, 16, m.Vocab)
	h16, err := NewHadamard(16)
	if err != nil {
		t.Fatal(err)
	}
	ok := StatsOptions{NumPrune: 1, Gram: GramCut, Start: 0}
	short := randomWindows(rng, 1, 15, m.Vocab)
	badID := randomWindows(rng, 1, 16, m.Vocab)
	badID[0][3] = m.Vocab
	tests := []struct {
		name    string
		h       *Hadamard
		windows [][]int
		first   int
		opts    StatsOptions
	}{
		{"wrong NumPrune", h, windows, 0, StatsOptions{NumPrune: 2}},
		{"Gram start past the end", h, windows, 0, StatsOptions{NumPrune: 1, Gram: GramCut, Start: 4}},
		{"Gram mode unknown", h, windows, 0, StatsOptions{NumPrune: 1, Gram: GramMode(9)}},
		{"Hadamard order", h16, windows, 0, ok},
		{"nil Hadamard", nil, windows, 0, ok},
		{"short window", h, short, 0, ok},
		{"token outside vocabulary", h, badID, 0, ok},
		{"negative index", h, windows, -1, ok},
		{"index held", h, windows, 8, ok},
		{"other Gram start", h, windows, 20, StatsOptions{NumPrune: 1, Gram: GramCut, Start: 1}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st := onePass(t, m, h, windows, 10, ok)
			before, _ := json.Marshal(st)
			err := Accumulate(context.Background(), m, tc.h, tc.windows, tc.first, tc.opts, st, nil)
			if !errors.Is(err, ErrStats) {
				t.Fatalf("Accumulate: %v, want ErrStats", err)
			}
			after, _ := json.Marshal(st)
			if string(before) != string(after) {
				t.Fatal("a failed Accumulate changed the statistics")
			}
		})
	}
	t.Run("patched model", func(t *testing.T) {
		st := NewStats(m.Config.Layers-1, m.Dim, 1, 16)
		p, _, err := Fit(onePass(t, m, h, windows, 0, ok), h, 1, MethodRotate, 0)
		if err != nil {
			t.Fatal(err)
		}
		err = Accumulate(context.Background(), m.Pruned(1, 2, p), h, windows, 0, ok, st, nil)
		if !errors.Is(err, ErrStats) {
			t.Fatalf("Accumulate on a patched model: %v, want ErrStats", err)
		}
	})
	t.Run("cancelled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		st := NewStats(m.Config.Layers, m.Dim, 1, 16)
		err := Accumulate(ctx, m, h, windows, 0, ok, st, nil)
		if !errors.Is(err, context.Canceled) || len(st.Windows) != 0 || len(st.Gram) != 0 {
			t.Fatalf("Accumulate after cancel: %v, %d windows", err, len(st.Windows))
		}
	})
}

func TestNewStatsPanics(t *testing.T) {
	for _, args := range [][4]int{{0, 8, 1, 4}, {4, 0, 1, 4}, {4, 8, 0, 4}, {4, 8, 5, 4}, {4, 8, 1, 0}} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("NewStats%v did not panic", args)
				}
			}()
			NewStats(args[0], args[1], args[2], args[3])
		}()
	}
}
