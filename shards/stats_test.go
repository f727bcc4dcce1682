package shards

import (
	"errors"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"linearpatch/patch"
)

// randStats returns valid statistics with random float64 bit patterns (NaN payloads,
// infinities and signed zeros included) and Gram sums for the given starts.
func randStats(r *rand.Rand, L, d, n, windows int, starts []int) *patch.Stats {
	st := patch.NewStats(L, d, n, 16)
	f := func() float64 {
		switch r.IntN(20) {
		case 0:
			return math.Float64frombits(0x7ff8000000000000 | r.Uint64()&0xfffffffffffff)
		case 1:
			return math.Copysign(0, -1)
		case 2:
			return math.Inf(-1)
		}
		return r.NormFloat64() * math.Exp(10*r.NormFloat64())
	}
	vec := func(n int) []float64 {
		v := make([]float64, n)
		for i := range v {
			v[i] = f()
		}
		return v
	}
	idx := 3
	for range windows {
		w := patch.WindowStats{Index: idx, Tokens: 16, CosSum: vec(L - n + 1), AbsMean: make([][]float64, L+1), RotAbsMean: make([][]float64, L+1)}
		for l := range w.AbsMean {
			w.AbsMean[l], w.RotAbsMean[l] = vec(d), vec(d)
		}
		st.Windows = append(st.Windows, w)
		idx += 1 + r.IntN(3)
	}
	if len(starts) > 0 {
		st.Gram = map[int]*patch.GramSum{}
		for _, i := range starts {
			st.Gram[i] = &patch.GramSum{Start: i, Tokens: st.Tokens(), XtX: vec(d * d), XtY: vec(d * d)}
		}
	}
	return st
}

func sameStats(t *testing.T, got, want *patch.Stats) {
	t.Helper()
	if got.Layers != want.Layers || got.Dim != want.Dim || got.NumPrune != want.NumPrune || got.SeqLen != want.SeqLen || len(got.Windows) != len(want.Windows) || len(got.Gram) != len(want.Gram) {
		t.Fatalf("shape (%d, %d, %d, %d, %d windows, %d Gram), want (%d, %d, %d, %d, %d, %d)",
			got.Layers, got.Dim, got.NumPrune, got.SeqLen, len(got.Windows), len(got.Gram), want.Layers, want.Dim, want.NumPrune, want.SeqLen, len(want.Windows), len(want.Gram))
	}
	for i := range want.Windows {
		g, w := &got.Windows[i], &want.Windows[i]
		if g.Index != w.Index || g.Tokens != w.Tokens || !sameBits(g.CosSum, w.CosSum) {
			t.Fatalf("window %d differs", i)
		}
		for l := range w.AbsMean {
			if !sameBits(g.AbsMean[l], w.AbsMean[l]) || !sameBits(g.RotAbsMean[l], w.RotAbsMean[l]) {
				t.Fatalf("window %d layer %d differs", i, l)
			}
		}
	}
	for i, w := range want.Gram {
		g := got.Gram[i]
		if g == nil || g.Start != w.Start || g.Tokens != w.Tokens || !sameBits(g.XtX, w.XtX) || !sameBits(g.XtY, w.XtY) {
			t.Fatalf("Gram %d differs", i)
		}
	}
}

func statsMeta(d int) Meta {
	return Meta{RunID: "run-1", Fingerprint: "fp-abc", Start: -1, End: -1, Dim: d, K: 50, Vocab: 32000, ActDType: Float16}
}

func TestStatsRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(30, 30))
	for _, tc := range []struct {
		name                   string
		L, d, n, windows       int
		starts                 []int
		maxPayload, minMessage int
	}{
		{"small payload", 6, 24, 2, 5, []int{0, 3}, HeaderMargin + 8<<10, 5},
		{"one message", 4, 8, 1, 3, nil, 1 << 20, 1},
		{"no windows", 4, 8, 2, 0, nil, 1 << 20, 1},
		{"d 1024 default payload", 3, 1024, 1, 40, []int{1, 2}, 1 << 20, 30},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := statsMeta(tc.d)
			st := randStats(r, tc.L, tc.d, tc.n, tc.windows, tc.starts)
			if err := st.Validate(); err != nil {
				t.Fatal(err)
			}
			msgs, err := EncodeStats(m, st, tc.maxPayload)
			if err != nil {
				t.Fatal(err)
			}
			if len(msgs) < tc.minMessage {
				t.Fatalf("%d messages, want at least %d", len(msgs), tc.minMessage)
			}
			for i, b := range msgs {
				if len(b) > tc.maxPayload-HeaderMargin {
					t.Fatalf("message %d: %d bytes > %d", i, len(b), tc.maxPayload-HeaderMargin)
				}
			}
			// Shuffled, with duplicates.
			in := append(slices.Clone(msgs), msgs[:len(msgs)/2]...)
			r.Shuffle(len(in), func(i, j int) { in[i], in[j] = in[j], in[i] })
			got, err := DecodeStats(in, m)
			if err != nil {
				t.Fatal(err)
			}
			sameStats(t, got, st)
			t.Logf("%d messages, largest %d bytes", len(msgs), slices.Max(lens(msgs)))
		})
	}
}

func lens(b [][]byte) []int {
	out := make([]int, len(b))
	for i := range b {
		out[i] = len(b[i])
	}
	return out
}

func TestStatsErrors(t *testing.T) {
	r := rand.New(rand.NewPCG(31, 31))
	m := statsMeta(16)
	st := randStats(r, 4, 16, 2, 4, []int{1})
	msgs, err := EncodeStats(m, st, HeaderMargin+4<<10)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := DecodeStats(msgs[1:], m); !errors.Is(err, ErrCorrupt) {
		t.Errorf("missing message: %v", err)
	}
	if _, err := DecodeStats(nil, m); !errors.Is(err, ErrCorrupt) {
		t.Errorf("no messages: %v", err)
	}
	other := m
	other.Fingerprint = "x"
	if _, err := DecodeStats(msgs, other); !errors.Is(err, ErrForeign) {
		t.Errorf("foreign: %v", err)
	}
	// A conflicting duplicate: the same rows with other values.
	st2 := randStats(rand.New(rand.NewPCG(31, 32)), 4, 16, 2, 4, []int{1})
	msgs2, err := EncodeStats(m, st2, HeaderMargin+4<<10)
	if err != nil {
		t.Fatal(err)
	}
	a := NewStatsAssembler(m)
	if err := a.Add(msgs[0]); err != nil {
		t.Fatal(err)
	}
	if err := a.Add(msgs2[0]); !errors.Is(err, ErrCorrupt) {
		t.Errorf("conflicting duplicate: %v", err)
	}
	// Other shapes.
	st3 := randStats(r, 5, 16, 2, 1, nil)
	msgs3, _ := EncodeStats(m, st3, 1<<20)
	if err := a.Add(msgs3[0]); !errors.Is(err, ErrCorrupt) {
		t.Errorf("other shape: %v", err)
	}
	// A chunk message is not statistics.
	cm := testMeta(Float16, 16, 50, 32000, false)
	cm.Start, cm.End = -1, -1
	b, err := EncodeMessage(cm, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Add(b); !errors.Is(err, ErrForeign) {
		t.Errorf("chunk message: %v", err)
	}
	if _, err := DecodeMessage(msgs[0], m); !errors.Is(err, ErrForeign) {
		t.Errorf("statistics as chunks: %v", err)
	}
	// Too small a payload, a wrong width, invalid statistics.
	if _, err := EncodeStats(m, st, HeaderMargin+100); !errors.Is(err, ErrPayload) {
		t.Errorf("tiny payload: %v", err)
	}
	if _, err := EncodeStats(statsMeta(8), st, 1<<20); !errors.Is(err, ErrInvalid) {
		t.Errorf("wrong width: %v", err)
	}
	bad := randStats(r, 4, 16, 2, 2, nil)
	bad.Windows[1].Index = bad.Windows[0].Index
	if _, err := EncodeStats(m, bad, 1<<20); !errors.Is(err, ErrInvalid) {
		t.Errorf("invalid statistics: %v", err)
	}
}

func TestStatsByteFlips(t *testing.T) {
	r := rand.New(rand.NewPCG(32, 32))
	m := statsMeta(4)
	st := randStats(r, 2, 4, 1, 1, []int{0})
	msgs, err := EncodeStats(m, st, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	for k, msg := range msgs {
		for i := range msg {
			b := slices.Clone(msg)
			b[i] ^= byte(1 + r.IntN(255))
			in := slices.Clone(msgs)
			in[k] = b
			got, err := DecodeStats(in, m)
			if err != nil {
				if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrForeign) && !errors.Is(err, ErrVersion) {
					t.Fatalf("message %d flip %d: %v wraps no sentinel", k, i, err)
				}
				continue
			}
			sameStats(t, got, st)
		}
	}
}
