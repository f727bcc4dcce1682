package student

import (
	"errors"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"linearpatch/model"
	"linearpatch/model/tensor"
)

// TestStepGradient checks, for each loss, the loss of Step against the float64 reference
// suffix and dL/dP against central finite differences of that reference, on the tiny
// synthetic model (every custom op in the graph, wired through gorgonia).
func TestStepGradient(t *testing.T) {
	for _, c := range []struct {
		loss LossKind
		end  int
		arch model.Config // features switched on
	}{
		{LossTopKKL, 2, model.Config{}},
		{LossTopKKL, 1, model.Config{QKVBias: true}},            // q/k/v biases (Qwen2)
		{LossTopKKL, 1, model.Config{QKNorm: true, HeadDim: 6}}, // q/k norm, head_dim ≠ d/heads (Qwen3)
		{LossFullKL, 2, model.Config{SlidingWindow: 2}},         // sliding window shorter than T (Mistral)
		{LossFullKL, 2, model.Config{}},
		{LossMSE, 2, model.Config{}},
		{LossTopKKL, 4, model.Config{}}, // cut right before the final norm: no layers
	} {
		t.Run(caseName("%s/end=%d/%s", c.loss, c.end, featName(c.arch)), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(11, uint64(c.end)))
			m := tinyArch(t, c.arch)
			opts := SuffixOptions{SeqLen: 5, Loss: c.loss, K: 7}
			p0 := randPatch(rng, m.Dim, 0.1)
			s, err := NewSuffix(m, c.end, p0, opts)
			if err != nil {
				t.Fatal(err)
			}
			batch := randBatch(rng, m, 2, 5, 7)
			loss, grad, err := s.Step(batch)
			if err != nil {
				t.Fatal(err)
			}
			opts = s.Options()
			p := to64(p0.Data)
			want := refLoss(m, c.end, opts, batch, p)
			if !near(loss, want, 1e-5) {
				t.Fatalf("loss %.9g, reference %.9g", loss, want)
			}
			fd := fdGrad(func(p []float64) float64 { return refLoss(m, c.end, opts, batch, p) }, p, 1e-6)
			checkGrad(t, "dL/dP", grad, fd, 1e-4)

			// The forward-only loss agrees, and P was not touched.
			if l2, err := s.Loss(batch); err != nil || l2 != loss {
				t.Fatalf("Loss = %v, %v; Step's loss %v", l2, err, loss)
			}
			if !slices.Equal(s.P(), p0.Data) {
				t.Fatal("Step changed P")
			}
		})
	}
}

// TestStepRerun checks that the graph re-runs with rebound inputs: a second batch gives its
// own loss and gradient (as a fresh suffix computes them), and the first batch again gives
// the first results exactly.
func TestStepRerun(t *testing.T) {
	rng := rand.New(rand.NewPCG(12, 1))
	m := tinyModel(t, false)
	opts := SuffixOptions{SeqLen: 6, K: 5}
	s, err := NewSuffix(m, 1, nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	b1, b2 := randBatch(rng, m, 2, 6, 5), randBatch(rng, m, 2, 6, 5)
	l1, g1, err := s.Step(b1)
	if err != nil {
		t.Fatal(err)
	}
	l2, g2, err := s.Step(b2)
	if err != nil {
		t.Fatal(err)
	}
	fresh, err := NewSuffix(m, 1, nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	l2f, g2f, err := fresh.Step(b2)
	if err != nil {
		t.Fatal(err)
	}
	if l2 != l2f || !slices.Equal(g2, g2f) {
		t.Fatalf("second step: loss %v vs fresh %v", l2, l2f)
	}
	l1b, g1b, err := s.Step(b1)
	if err != nil {
		t.Fatal(err)
	}
	if l1 != l1b || !slices.Equal(g1, g1b) {
		t.Fatalf("first batch again: loss %v vs %v", l1b, l1)
	}
	// A batch of another size builds its own graph; its loss is the mean of the windows'.
	one, _, err := s.Step(b1[:1])
	if err != nil {
		t.Fatal(err)
	}
	two, _, err := s.Step(b1[1:])
	if err != nil {
		t.Fatal(err)
	}
	if !near((one+two)/2, l1, 1e-6) {
		t.Fatalf("mean of single windows %v, batch loss %v", (one+two)/2, l1)
	}
}

// TestForwardMatchesEngine checks the gorgonia suffix against the engine: X·P through
// layers end..L−1 (model.RunLayers), then model.Logits.
func TestForwardMatchesEngine(t *testing.T) {
	cases := []struct {
		name string
		cfg  model.Config
		end  int
		T    int
	}{
		{"tiny", model.Config{Dim: 16, Layers: 4, Heads: 4, KVHeads: 2, FFN: 32, Vocab: 50}, 2, 9},
		{"tiny-bias", model.Config{Dim: 16, Layers: 4, Heads: 4, KVHeads: 2, FFN: 32, Vocab: 50, QKVBias: true}, 1, 4},
		{"tinystories-shape", model.Config{Dim: 128, Layers: 8, Heads: 4, KVHeads: 2, FFN: 352, Vocab: 1024, HeadDim: 32}, 5, 70},
		{"no-layers", model.Config{Dim: 16, Layers: 4, Heads: 4, KVHeads: 2, FFN: 32, Vocab: 50}, 4, 3},
		{"qwen3-qknorm", model.Config{Dim: 32, Layers: 3, Heads: 4, KVHeads: 2, FFN: 48, Vocab: 60, HeadDim: 12, QKNorm: true}, 1, 20},
		{"mistral-window", model.Config{Dim: 32, Layers: 3, Heads: 4, KVHeads: 2, FFN: 48, Vocab: 60, SlidingWindow: 7}, 1, 70},
		{"tinystories-shape-bf16", model.Config{Dim: 128, Layers: 8, Heads: 4, KVHeads: 2, FFN: 352, Vocab: 1024, HeadDim: 32}, 5, 70},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(13, uint64(c.T)))
			m, err := model.Synthetic(c.cfg, 3)
			if err != nil {
				t.Fatal(err)
			}
			if strings.HasSuffix(c.name, "-bf16") {
				m = m.WithDType(tensor.BF16) // weights stay BF16 in the student and the engine
			}
			p := randPatch(rng, m.Dim, 0.05)
			s, err := NewSuffix(m, c.end, p, SuffixOptions{SeqLen: c.T})
			if err != nil {
				t.Fatal(err)
			}
			xcut := randSlice(rng, c.T*m.Dim, 1)
			x0 := slices.Clone(xcut)
			got := s.Forward(xcut)
			if !slices.Equal(xcut, x0) {
				t.Fatal("Forward modified its input")
			}

			x := tensor.New(c.T, m.Dim)
			tensor.Mul(x, tensor.FromData(c.T, m.Dim, xcut), p)
			m.RunLayers(x, c.T, c.end, m.Config.Layers, nil)
			want := m.Logits(x)
			checkClose(t, "logits", got, to64(want.Data), 1e-5)
			var worst float64
			for i, v := range want.Data {
				worst = math.Max(worst, math.Abs(float64(got[i]-v)))
			}
			t.Logf("max |Δlogit| = %.3g", worst)
		})
	}
}

func TestNewSuffixErrors(t *testing.T) {
	m := tinyModel(t, false)
	cases := []struct {
		name string
		m    *model.Model
		end  int
		p0   *tensor.Matrix
		opts SuffixOptions
		want error
	}{
		{"no seq-len", m, 2, nil, SuffixOptions{}, ErrOptions},
		{"bad loss", m, 2, nil, SuffixOptions{SeqLen: 4, Loss: "l2"}, ErrOptions},
		{"k > vocab", m, 2, nil, SuffixOptions{SeqLen: 4, K: 51}, ErrOptions},
		{"nil model", nil, 2, nil, SuffixOptions{SeqLen: 4}, ErrModel},
		{"end past layers", m, 5, nil, SuffixOptions{SeqLen: 4}, ErrModel},
		{"patch shape", m, 2, tensor.New(16, 15), SuffixOptions{SeqLen: 4}, ErrModel},
	}
	missing := *m
	missing.Layers = slices.Clone(m.Layers)
	missing.Layers[3] = nil
	cases = append(cases, struct {
		name string
		m    *model.Model
		end  int
		p0   *tensor.Matrix
		opts SuffixOptions
		want error
	}{"layer missing", &missing, 2, nil, SuffixOptions{SeqLen: 4}, ErrModel})
	noHead := *m
	noHead.Head = nil
	cases = append(cases, struct {
		name string
		m    *model.Model
		end  int
		p0   *tensor.Matrix
		opts SuffixOptions
		want error
	}{"no head", &noHead, 2, nil, SuffixOptions{SeqLen: 4}, ErrModel})
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if _, err := NewSuffix(c.m, c.end, c.p0, c.opts); !errors.Is(err, c.want) {
				t.Fatalf("err = %v, want %v", err, c.want)
			}
		})
	}
	// A model with only the layers after the cut (the student's memory) is enough, and
	// mse needs neither the final norm nor the head.
	part := *m
	part.Layers = slices.Clone(m.Layers)
	part.Layers[0], part.Layers[1] = nil, nil
	part.Head, part.Norm = nil, nil
	if _, err := NewSuffix(&part, 2, nil, SuffixOptions{SeqLen: 4, Loss: LossMSE}); err != nil {
		t.Fatal(err)
	}
}

func TestStepBatchErrors(t *testing.T) {
	rng := rand.New(rand.NewPCG(14, 1))
	m := tinyModel(t, false)
	s, err := NewSuffix(m, 2, nil, SuffixOptions{SeqLen: 4, K: 3})
	if err != nil {
		t.Fatal(err)
	}
	full, err := NewSuffix(m, 2, nil, SuffixOptions{SeqLen: 4, Loss: LossFullKL})
	if err != nil {
		t.Fatal(err)
	}
	good := randBatch(rng, m, 1, 4, 3)[0]
	mod := func(f func(e *Example)) []Example {
		e := good
		e.XCut, e.TopKIdx, e.TopKProb = slices.Clone(e.XCut), slices.Clone(e.TopKIdx), slices.Clone(e.TopKProb)
		f(&e)
		return []Example{e}
	}
	for _, c := range []struct {
		name  string
		s     *Suffix
		batch []Example
	}{
		{"empty", s, nil},
		{"short XCut", s, mod(func(e *Example) { e.XCut = e.XCut[1:] })},
		{"short top-k", s, mod(func(e *Example) { e.TopKIdx = e.TopKIdx[1:] })},
		{"id outside vocab", s, mod(func(e *Example) { e.TopKIdx[2] = 50 })},
		{"negative id", s, mod(func(e *Example) { e.TopKIdx[0] = -1 })},
		{"NaN probability", s, mod(func(e *Example) { e.TopKProb[1] = float32(math.NaN()) })},
		{"no XFinal", full, mod(func(e *Example) { e.XFinal = nil })},
	} {
		t.Run(c.name, func(t *testing.T) {
			if _, _, err := c.s.Step(c.batch); !errors.Is(err, ErrBatch) {
				t.Fatalf("Step: err = %v, want ErrBatch", err)
			}
			if _, err := c.s.Loss(c.batch); !errors.Is(err, ErrBatch) {
				t.Fatalf("Loss: err = %v, want ErrBatch", err)
			}
		})
	}
}

func TestPAndSetP(t *testing.T) {
	m := tinyModel(t, false)
	s, err := NewSuffix(m, 2, nil, SuffixOptions{SeqLen: 3})
	if err != nil {
		t.Fatal(err)
	}
	p := s.P()
	for i := range 16 {
		for j := range 16 {
			if want := float32(map[bool]int{true: 1}[i == j]); p[i*16+j] != want {
				t.Fatalf("P[%d,%d] = %v, want the identity", i, j, p[i*16+j])
			}
		}
	}
	p[3] = 7 // a copy: the suffix is unchanged
	if s.P()[3] != 0 {
		t.Fatal("P() returned the suffix's storage")
	}
	s.SetP(p)
	if s.P()[3] != 7 {
		t.Fatal("SetP did not take")
	}
	defer func() {
		if recover() == nil {
			t.Fatal("SetP with a wrong length did not panic")
		}
	}()
	s.SetP(p[1:])
}

// TestTrainingReducesLoss runs a few AdamW steps from a perturbed patch toward the model's
// own (identity-patch) outputs and checks the loss falls.
func TestTrainingReducesLoss(t *testing.T) {
	rng := rand.New(rand.NewPCG(15, 1))
	m := tinyModel(t, false)
	T, K, end := 8, 10, 2
	// Teacher: the identity patch; its top-k from its own logits.
	teacher, err := NewSuffix(m, end, nil, SuffixOptions{SeqLen: T, K: K})
	if err != nil {
		t.Fatal(err)
	}
	batch := randBatch(rng, m, 2, T, K)
	for b := range batch {
		logits := teacher.Forward(batch[b].XCut)
		for r := range T {
			row := logits[r*m.Vocab : (r+1)*m.Vocab]
			ids := make([]int32, m.Vocab)
			for i := range ids {
				ids[i] = int32(i)
			}
			slices.SortFunc(ids, func(a, b int32) int { return cmpDesc(row[a], row[b]) })
			z := make([]float32, K)
			for j := range K {
				batch[b].TopKIdx[r*K+j] = ids[j]
				z[j] = row[ids[j]]
			}
			tensor.Softmax(z)
			copy(batch[b].TopKProb[r*K:], z)
		}
	}
	s, err := NewSuffix(m, end, randPatch(rng, m.Dim, 0.3), SuffixOptions{SeqLen: T, K: K})
	if err != nil {
		t.Fatal(err)
	}
	opt := NewAdamW()
	first, _, err := s.Step(batch)
	if err != nil {
		t.Fatal(err)
	}
	const steps = 60
	var last float64
	for i := range steps {
		loss, grad, err := s.Step(batch)
		if err != nil {
			t.Fatal(err)
		}
		last = loss
		p := s.P()
		opt.Update(p, grad, CosineLR(1e-2, i, steps, 1.0/20))
		s.SetP(p)
	}
	t.Logf("loss %.5f -> %.5f", first, last)
	if !(last < 0.5*first) {
		t.Fatalf("loss %.5f -> %.5f: did not fall by half", first, last)
	}
}

func cmpDesc(a, b float32) int {
	switch {
	case a > b:
		return -1
	case a < b:
		return 1
	}
	return 0
}
