package patch

import (
	"context"
	"errors"
	"fmt"
	"math"
	"runtime"
	"slices"
	"sort"
	"sync"

	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/blas64"

	"linearpatch/model"
	"linearpatch/model/tensor"
)

// ErrStats is wrapped by errors about statistics that do not fit together: a model, a
// Hadamard matrix, windows or another Stats whose shape or settings differ, a window index
// seen twice, or a malformed Stats (one decoded from the wire).
var ErrStats = errors.New("patch: statistics do not match")

// GramMode says which Gram sums a calibration pass collects.
type GramMode int

const (
	// GramNone collects no Gram sums (enough for selection and the diag/rotate patches).
	GramNone GramMode = iota
	// GramAll collects the Gram sums of every candidate start i = 0..L−n: 2·(L−n+1)
	// float64 d×d matrices, so mind the memory for a large d.
	GramAll
	// GramCut collects the Gram sums of the single start StatsOptions.Start.
	GramCut
)

// StatsOptions are the settings of a calibration pass.
type StatsOptions struct {
	NumPrune int      // n, the number of layers in the block; must equal Stats.NumPrune
	Gram     GramMode // which Gram sums to collect
	Start    int      // the start i for GramCut; ignored otherwise
}

// gramStarts returns the sorted starts whose Gram sums opts asks for.
func (o StatsOptions) gramStarts(layers int) ([]int, error) {
	last := layers - o.NumPrune
	switch o.Gram {
	case GramNone:
		return nil, nil
	case GramAll:
		s := make([]int, last+1)
		for i := range s {
			s[i] = i
		}
		return s, nil
	case GramCut:
		if o.Start < 0 || o.Start > last {
			return nil, fmt.Errorf("%w: Gram start %d outside 0..%d (L = %d, n = %d)", ErrStats, o.Start, last, layers, o.NumPrune)
		}
		return []int{o.Start}, nil
	}
	return nil, fmt.Errorf("%w: unknown Gram mode %d", ErrStats, o.Gram)
}

// Stats are the mergeable statistics of a calibration pass for one NumPrune.
//
// Per-window statistics are computed from each window alone, in token order and in
// float64, so they do not depend on how the calibration stream was split across passes or
// machines; Cosine and Fit's scales reduce them in Index order and are therefore bit-exact
// however the pass was split. Gram sums are float64 sums over blocks of tokens whose
// grouping depends on the split: a merged Gram equals a single pass to about 1e-12
// relative, not bitwise.
//
// All fields are exported, so encoding/json carries a Stats between machines (call
// Validate after decoding one). A Stats is not safe for concurrent mutation.
type Stats struct {
	Layers   int `json:"layers"`    // L
	Dim      int `json:"dim"`       // d
	NumPrune int `json:"num_prune"` // n
	SeqLen   int `json:"seq_len"`   // tokens per window

	Windows []WindowStats `json:"windows"` // sorted by Index, one per calibration window

	// Gram is keyed by start i: float64 sums over all tokens of XᵢᵀXᵢ and XᵢᵀX_{i+n}.
	// Absent (nil or empty) unless requested.
	Gram map[int]*GramSum `json:"gram,omitempty"`
}

// WindowStats are the statistics of one calibration window.
type WindowStats struct {
	Index  int `json:"index"` // the window's index in the calibration stream (global)
	Tokens int `json:"tokens"`

	// CosSum[i], i = 0..L−n: Σ_t cos(X_i[t], X_{i+n}[t]) over this window's tokens, the
	// cosine over the hidden dimension in float64 (0 for a zero vector).
	CosSum []float64 `json:"cos_sum"`
	// AbsMean[l][c], l = 0..L: mean over tokens of |X_l[t,c]|.
	AbsMean [][]float64 `json:"abs_mean"`
	// RotAbsMean[l][c]: mean over tokens of |(X_l·H)[t,c]|.
	RotAbsMean [][]float64 `json:"rot_abs_mean"`
}

// GramSum holds the least-squares sums of one start i over Tokens tokens.
type GramSum struct {
	Start  int       `json:"start"`
	Tokens int64     `json:"tokens"`
	XtX    []float64 `json:"xtx"` // XᵢᵀXᵢ, d×d row-major, symmetric (both triangles stored)
	XtY    []float64 `json:"xty"` // XᵢᵀX_{i+n}, d×d row-major
}

// NewStats returns empty statistics for a model of the given depth and width, blocks of
// numPrune layers and windows of seqLen tokens. It panics unless 1 ≤ numPrune ≤ layers
// and dim, seqLen ≥ 1 (a caller bug).
func NewStats(layers, dim, numPrune, seqLen int) *Stats {
	if layers < 1 || dim < 1 || seqLen < 1 || numPrune < 1 || numPrune > layers {
		panic(fmt.Sprintf("patch: NewStats(layers %d, dim %d, numPrune %d, seqLen %d): invalid shape", layers, dim, numPrune, seqLen))
	}
	return &Stats{Layers: layers, Dim: dim, NumPrune: numPrune, SeqLen: seqLen}
}

// Tokens returns the number of calibration tokens in s.
func (s *Stats) Tokens() int64 {
	var n int64
	for i := range s.Windows {
		n += int64(s.Windows[i].Tokens)
	}
	return n
}

// Cosine returns the mean cosine between X_i and X_{i+n} per start i = 0..L−n: the
// windows' CosSum added in Index order, divided by the total token count. It is therefore
// bit-exact however the pass was split. It returns nil when s holds no tokens.
func (s *Stats) Cosine() []float64 {
	total := s.Tokens()
	if total == 0 {
		return nil
	}
	out := make([]float64, s.Layers-s.NumPrune+1)
	for w := range s.Windows {
		for i, v := range s.Windows[w].CosSum {
			out[i] += v
		}
	}
	for i := range out {
		out[i] /= float64(total)
	}
	return out
}

// Validate checks that s is well formed: positive shape, windows sorted by distinct
// non-negative Index with slices of the right lengths, and Gram sums of the right size whose
// token counts equal the windows'. Errors wrap ErrStats.
func (s *Stats) Validate() error {
	if s.Layers < 1 || s.Dim < 1 || s.SeqLen < 1 || s.NumPrune < 1 || s.NumPrune > s.Layers {
		return fmt.Errorf("%w: invalid shape (layers %d, dim %d, num_prune %d, seq_len %d)", ErrStats, s.Layers, s.Dim, s.NumPrune, s.SeqLen)
	}
	L, d, starts := s.Layers, s.Dim, s.Layers-s.NumPrune+1
	for k := range s.Windows {
		w := &s.Windows[k]
		if w.Index < 0 || (k > 0 && w.Index <= s.Windows[k-1].Index) {
			return fmt.Errorf("%w: window %d has index %d: indices must be distinct, non-negative and sorted", ErrStats, k, w.Index)
		}
		if w.Tokens < 1 || len(w.CosSum) != starts || len(w.AbsMean) != L+1 || len(w.RotAbsMean) != L+1 {
			return fmt.Errorf("%w: window %d: %d tokens, %d cosine sums (want %d), %d/%d layers of means (want %d)",
				ErrStats, w.Index, w.Tokens, len(w.CosSum), starts, len(w.AbsMean), len(w.RotAbsMean), L+1)
		}
		for l := 0; l <= L; l++ {
			if len(w.AbsMean[l]) != d || len(w.RotAbsMean[l]) != d {
				return fmt.Errorf("%w: window %d layer %d: means of width %d/%d, want %d", ErrStats, w.Index, l, len(w.AbsMean[l]), len(w.RotAbsMean[l]), d)
			}
		}
	}
	total := s.Tokens()
	for i, g := range s.Gram {
		if g == nil || g.Start != i || i < 0 || i >= starts || len(g.XtX) != d*d || len(g.XtY) != d*d {
			return fmt.Errorf("%w: Gram sums keyed %d are malformed (start, or size not %d×%d)", ErrStats, i, d, d)
		}
		if g.Tokens != total {
			return fmt.Errorf("%w: Gram sums of start %d cover %d tokens, the windows %d", ErrStats, i, g.Tokens, total)
		}
	}
	return nil
}

// Merge adds o into s: windows are unioned by Index and Gram sums added. Merging is
// associative and commutative up to the Gram sums' rounding (per-window statistics and
// Cosine are exact in any order). An empty o (no windows) changes nothing; an empty s takes
// o's Gram starts. It returns an error wrapping ErrStats, leaving s unchanged, when the
// shapes or settings differ, an index is in both, the Gram starts differ, or either is
// malformed. s copies what it keeps of o.
func (s *Stats) Merge(o *Stats) error {
	if err := s.Validate(); err != nil {
		return err
	}
	if err := o.Validate(); err != nil {
		return fmt.Errorf("merge: %w", err)
	}
	if s.Layers != o.Layers || s.Dim != o.Dim || s.NumPrune != o.NumPrune || s.SeqLen != o.SeqLen {
		return fmt.Errorf("%w: merge (layers %d, dim %d, num_prune %d, seq_len %d) with (%d, %d, %d, %d)",
			ErrStats, s.Layers, s.Dim, s.NumPrune, s.SeqLen, o.Layers, o.Dim, o.NumPrune, o.SeqLen)
	}
	if len(o.Windows) == 0 {
		return nil
	}
	if len(s.Windows) > 0 && !slices.Equal(gramKeys(s.Gram), gramKeys(o.Gram)) {
		return fmt.Errorf("%w: merge: Gram sums for starts %v and %v", ErrStats, gramKeys(s.Gram), gramKeys(o.Gram))
	}
	for a, b := 0, 0; a < len(s.Windows) && b < len(o.Windows); {
		switch ia, ib := s.Windows[a].Index, o.Windows[b].Index; {
		case ia == ib:
			return fmt.Errorf("%w: merge: window %d is in both", ErrStats, ia)
		case ia < ib:
			a++
		default:
			b++
		}
	}

	merged := make([]WindowStats, 0, len(s.Windows)+len(o.Windows))
	merged = append(merged, s.Windows...)
	for k := range o.Windows {
		merged = append(merged, o.Windows[k].clone())
	}
	sort.Slice(merged, func(a, b int) bool { return merged[a].Index < merged[b].Index })
	if len(s.Windows) == 0 {
		s.Gram = make(map[int]*GramSum, len(o.Gram))
		for i, g := range o.Gram {
			s.Gram[i] = g.clone()
		}
	} else {
		for i, g := range o.Gram {
			s.Gram[i].add(g)
		}
	}
	s.Windows = merged
	return nil
}

func gramKeys(g map[int]*GramSum) []int {
	keys := make([]int, 0, len(g))
	for k := range g {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func (w *WindowStats) clone() WindowStats {
	c := *w
	c.CosSum = slices.Clone(w.CosSum)
	c.AbsMean = cloneRows(w.AbsMean)
	c.RotAbsMean = cloneRows(w.RotAbsMean)
	return c
}

func cloneRows(r [][]float64) [][]float64 {
	out := make([][]float64, len(r))
	for i := range r {
		out[i] = slices.Clone(r[i])
	}
	return out
}

func (g *GramSum) clone() *GramSum {
	return &GramSum{Start: g.Start, Tokens: g.Tokens, XtX: slices.Clone(g.XtX), XtY: slices.Clone(g.XtY)}
}

func (g *GramSum) add(o *GramSum) {
	g.Tokens += o.Tokens
	for k, v := range o.XtX {
		g.XtX[k] += v
	}
	for k, v := range o.XtY {
		g.XtY[k] += v
	}
}

// statsBatchRows is the number of token rows one forward of Accumulate aims for.
const statsBatchRows = 2048

// Accumulate runs m over windows, whose indices in the calibration stream are firstIndex,
// firstIndex+1, …, and adds their statistics (and the Gram sums opts asks for) to st.
// Windows are batched several per forward, batches aligned to multiples of a fixed batch
// size in global index. progress, when non-nil, is called with the number of windows of
// this call done so far.
//
// m must be the dense model (no patch) with embeddings and every layer loaded; h must have
// order st.Dim. It returns an error wrapping ErrStats, before any work, when the model, h,
// opts or the windows (length other than st.SeqLen, ids outside the vocabulary, an index st
// already holds) do not fit st, or when st already holds Gram sums for other starts; and
// ctx's error when ctx ends. On any error st is unchanged.
func Accumulate(ctx context.Context, m *model.Model, h *Hadamard, windows [][]int, firstIndex int, opts StatsOptions, st *Stats, progress func(done int)) error {
	if err := st.Validate(); err != nil {
		return err
	}
	L, d, n, T := st.Layers, st.Dim, st.NumPrune, st.SeqLen
	switch {
	case m.Config.Layers != L || len(m.Layers) != L || m.Dim != d:
		return fmt.Errorf("%w: model has %d layers of width %d, statistics %d of width %d", ErrStats, len(m.Layers), m.Dim, L, d)
	case h == nil || h.Dim() != d:
		return fmt.Errorf("%w: Hadamard matrix of order %d, want %d", ErrStats, hadamardDim(h), d)
	case opts.NumPrune != n:
		return fmt.Errorf("%w: options prune %d layers, statistics %d", ErrStats, opts.NumPrune, n)
	case firstIndex < 0:
		return fmt.Errorf("%w: first window index %d is negative", ErrStats, firstIndex)
	case m.Patch != nil:
		return fmt.Errorf("%w: the model carries a patch: calibrate on the dense model", ErrStats)
	case m.Embed == nil || slices.Contains(m.Layers, nil):
		return fmt.Errorf("%w: the model lacks its embeddings or some layers", ErrStats)
	}
	starts, err := opts.gramStarts(L)
	if err != nil {
		return err
	}
	if len(st.Windows) > 0 && !slices.Equal(gramKeys(st.Gram), starts) {
		return fmt.Errorf("%w: statistics hold Gram sums for starts %v, options ask for %v", ErrStats, gramKeys(st.Gram), starts)
	}
	for k, w := range windows {
		if len(w) != T {
			return fmt.Errorf("%w: window %d has %d tokens, want %d", ErrStats, firstIndex+k, len(w), T)
		}
		for _, id := range w {
			if id < 0 || id >= m.Vocab {
				return fmt.Errorf("%w: window %d holds token id %d outside the vocabulary [0,%d)", ErrStats, firstIndex+k, id, m.Vocab)
			}
		}
		if _, dup := slices.BinarySearchFunc(st.Windows, firstIndex+k, func(w WindowStats, i int) int { return w.Index - i }); dup {
			return fmt.Errorf("%w: window %d is already accumulated", ErrStats, firstIndex+k)
		}
	}
	if len(windows) == 0 {
		return nil
	}

	local := NewStats(L, d, n, T)
	if len(starts) > 0 {
		local.Gram = make(map[int]*GramSum, len(starts))
		for _, i := range starts {
			local.Gram[i] = &GramSum{Start: i, XtX: make([]float64, d*d), XtY: make([]float64, d*d)}
		}
	}
	local.Windows = make([]WindowStats, len(windows))
	bs := max(1, statsBatchRows/T)
	acc := newAccumulator(local, h, starts, min(bs, len(windows))*T)
	for lo := 0; lo < len(windows); {
		if err := ctx.Err(); err != nil {
			return err
		}
		g := firstIndex + lo
		hi := min(len(windows), (g/bs+1)*bs-firstIndex) // end of g's aligned batch
		if err := acc.batch(ctx, m, windows[lo:hi], local.Windows[lo:hi], g); err != nil {
			return err // local statistics are dropped: st is unchanged
		}
		lo = hi
		if progress != nil {
			progress(lo)
		}
	}
	for _, gs := range local.Gram {
		mirrorUpper(gs.XtX, d)
		gs.Tokens = int64(len(windows) * T)
	}
	return st.Merge(local)
}

func hadamardDim(h *Hadamard) int {
	if h == nil {
		return 0
	}
	return h.Dim()
}

// mirrorUpper copies the upper triangle of the d×d row-major a into its lower triangle.
func mirrorUpper(a []float64, d int) {
	for r := 1; r < d; r++ {
		for c := 0; c < r; c++ {
			a[r*d+c] = a[c*d+r]
		}
	}
}

// accumulator holds the scratch space of Accumulate.
type accumulator struct {
	st     *Stats
	h      *Hadamard
	starts map[int]bool
	ring   []*tensor.Matrix // ring[l%(n+1)] holds X_l of the batch
	xi, xj []float64        // float64 copies of X_i and X_{i+n} for the Gram sums
	procs  int
}

func newAccumulator(st *Stats, h *Hadamard, starts []int, rows int) *accumulator {
	a := &accumulator{st: st, h: h, starts: map[int]bool{}, procs: max(1, runtime.GOMAXPROCS(0))}
	for _, i := range starts {
		a.starts[i] = true
	}
	a.ring = make([]*tensor.Matrix, st.NumPrune+1)
	for k := range a.ring {
		a.ring[k] = tensor.New(rows, st.Dim)
	}
	if len(starts) > 0 {
		a.xi = make([]float64, rows*st.Dim)
		a.xj = make([]float64, rows*st.Dim)
	}
	return a
}

// batch runs one forward over ids (global indices first, first+1, …) and fills out; it
// stops between layers with ctx's error once ctx ends.
func (a *accumulator) batch(ctx context.Context, m *model.Model, ids [][]int, out []WindowStats, first int) error {
	L, T := a.st.Layers, a.st.SeqLen
	for b := range out {
		out[b] = WindowStats{
			Index:      first + b,
			Tokens:     T,
			CosSum:     make([]float64, L-a.st.NumPrune+1),
			AbsMean:    make([][]float64, L+1),
			RotAbsMean: make([][]float64, L+1),
		}
	}
	x := m.Embeddings(ids)
	a.observe(0, x, out)
	return m.RunLayersContext(ctx, x, T, 0, L, func(l int, x *tensor.Matrix) { a.observe(l+1, x, out) })
}

// observe takes the state X_l of the batch (rows b·T+t) into the windows' statistics and,
// when l−n is a Gram start, into the Gram sums.
func (a *accumulator) observe(l int, x *tensor.Matrix, out []WindowStats) {
	n, d, T := a.st.NumPrune, a.st.Dim, a.st.SeqLen
	var prev *tensor.Matrix // X_{l−n}
	if l >= n {
		prev = a.ring[(l-n)%(n+1)]
	}
	var wg sync.WaitGroup
	workers := min(a.procs, len(out))
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rot := make([]float64, d)
			for b := w; b < len(out); b += workers {
				ws := &out[b]
				abs := make([]float64, d)
				rabs := make([]float64, d)
				var cos float64
				for t := range T {
					r := b*T + t
					row := x.Row(r)
					for c, v := range row {
						f := float64(v)
						abs[c] += math.Abs(f)
						rot[c] = f
					}
					a.h.Rotate(rot)
					for c, v := range rot {
						rabs[c] += math.Abs(v)
					}
					if prev != nil {
						cos += cosine(prev.Row(r), row)
					}
				}
				for c := range abs {
					abs[c] /= float64(T)
					rabs[c] /= float64(T)
				}
				ws.AbsMean[l], ws.RotAbsMean[l] = abs, rabs
				if prev != nil {
					ws.CosSum[l-n] = cos
				}
			}
		}()
	}
	wg.Wait()

	if prev != nil && a.starts[l-n] {
		rows := x.Rows
		xi, xj := a.xi[:rows*d], a.xj[:rows*d]
		for k := range xi {
			xi[k] = float64(prev.Data[k])
			xj[k] = float64(x.Data[k])
		}
		g := a.st.Gram[l-n]
		gi := blas64.General{Rows: rows, Cols: d, Stride: d, Data: xi}
		gj := blas64.General{Rows: rows, Cols: d, Stride: d, Data: xj}
		blas64.Syrk(blas.Trans, 1, gi, 1, blas64.Symmetric{Uplo: blas.Upper, N: d, Stride: d, Data: g.XtX})
		blas64.Gemm(blas.Trans, blas.NoTrans, 1, gi, gj, 1, blas64.General{Rows: d, Cols: d, Stride: d, Data: g.XtY})
	}
	if l <= a.st.Layers-n { // X_l is the start of a later cosine
		dst := a.ring[l%(n+1)]
		dst.Rows = x.Rows
		dst.Data = dst.Data[:len(x.Data)]
		copy(dst.Data, x.Data)
	}
}

// cosine returns the cosine of the angle between a and b in float64, 0 when either is zero.
func cosine(a, b []float32) float64 {
	var dot, na, nb float64
	for k, v := range a {
		x, y := float64(v), float64(b[k])
		dot += x * y
		na += x * x
		nb += y * y
	}
	if na == 0 || nb == 0 {
		return 0
	}
	return dot / (math.Sqrt(na) * math.Sqrt(nb))
}
