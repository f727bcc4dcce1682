package student

import (
	"errors"
	"fmt"
	"slices"
)

// ErrStepGradient: a window's gradient does not belong to the step it was added to (another
// step, a window added twice, another size), or the step is incomplete.
var ErrStepGradient = errors.New("student: step gradient")

// WindowGrad is one window's contribution to an optimizer step: what a process that
// computed the window hands to the one that applies the step.
type WindowGrad struct {
	Ref         WindowRef
	Grad        []float32 // dL_w/dP, d×d row-major: the gradient of the window's own loss
	Loss        float64   // the window's loss, its mean over its tokens
	ShardSHA256 string    // the SHA-256 of the shard file the window was read from
	// Fingerprint is the hash of the computing trainer's Fingerprint (configuration, data,
	// P0, build): students sharing steps refuse a gradient computed under another.
	Fingerprint string
}

// gradSum adds per-window gradients in float64, in the order they are added.
type gradSum struct {
	n    int
	sum  []float64
	loss float64
}

func newGradSum(size int) *gradSum { return &gradSum{sum: make([]float64, size)} }

func (s *gradSum) add(g []float32, loss float64) {
	for i, v := range g {
		s.sum[i] += float64(v)
	}
	s.loss += loss
	s.n++
}

// mean returns Σ g / n and Σ loss / n (the sum itself, reused).
func (s *gradSum) mean() ([]float64, float64) {
	inv := float64(s.n)
	for i := range s.sum {
		s.sum[i] /= inv
	}
	return s.sum, s.loss / inv
}

// StepGradient is the gradient of one optimizer step: the sum of its windows' gradients,
// accumulated in float64 in window order (the order of Trainer.StepWindows), divided by the
// number of windows; the loss likewise. Windows may be added in any order: one that arrives
// before a window it follows is held until that one is in, so the sum's bits depend only on
// the windows' gradients, never on who computed them or when (floating-point addition is
// not associative: the order is part of the result). A StepGradient is not safe for
// concurrent use.
type StepGradient struct {
	step    int
	refs    []WindowRef
	size    int
	sum     *gradSum
	pending map[int]WindowGrad // added, not yet summed, by position
	shards  map[int]string     // shard → SHA-256 of the windows added
	used    bool               // the sum was divided (by ApplyStep)
}

// NewStepGradient returns an empty gradient of step (0-based) over windows (in window
// order), for a patch of size values. It panics if windows is empty or holds a window
// twice, or size < 1 (caller bugs).
func NewStepGradient(step int, windows []WindowRef, size int) *StepGradient {
	if len(windows) == 0 || size < 1 {
		panic(fmt.Sprintf("student: NewStepGradient with %d windows of %d values", len(windows), size))
	}
	seen := map[WindowRef]bool{}
	for _, r := range windows {
		if seen[r] {
			panic(fmt.Sprintf("student: NewStepGradient: window %+v twice", r))
		}
		seen[r] = true
	}
	return &StepGradient{step: step, refs: slices.Clone(windows), size: size, sum: newGradSum(size),
		pending: map[int]WindowGrad{}, shards: map[int]string{}}
}

// Step returns the step the gradient belongs to.
func (g *StepGradient) Step() int { return g.step }

// Windows returns the step's windows in window order (a copy).
func (g *StepGradient) Windows() []WindowRef { return slices.Clone(g.refs) }

// Add records w. It keeps w.Grad until it is summed (the caller must not modify it until
// Complete). Errors wrap ErrStepGradient: a window not of this step or already added, a
// gradient of the wrong size, or a shard whose checksum differs from an earlier window's.
func (g *StepGradient) Add(w WindowGrad) error {
	i := slices.Index(g.refs, w.Ref)
	switch {
	case g.used:
		return fmt.Errorf("%w: step %d was already applied", ErrStepGradient, g.step+1)
	case i < 0:
		return fmt.Errorf("%w: window %+v is not in step %d", ErrStepGradient, w.Ref, g.step+1)
	case i < g.sum.n || g.pending[i].Grad != nil:
		return fmt.Errorf("%w: window %+v of step %d added twice", ErrStepGradient, w.Ref, g.step+1)
	case len(w.Grad) != g.size:
		return fmt.Errorf("%w: window %+v: gradient of %d values, want %d", ErrStepGradient, w.Ref, len(w.Grad), g.size)
	}
	if old, ok := g.shards[w.Ref.Shard]; ok && old != w.ShardSHA256 {
		return fmt.Errorf("%w: shard %d read with sha256 %s and %s in step %d", ErrStepGradient, w.Ref.Shard, old, w.ShardSHA256, g.step+1)
	}
	g.shards[w.Ref.Shard] = w.ShardSHA256
	g.pending[i] = w
	for {
		next, ok := g.pending[g.sum.n]
		if !ok {
			return nil
		}
		delete(g.pending, g.sum.n)
		g.sum.add(next.Grad, next.Loss)
	}
}

// Complete reports whether every window of the step was added.
func (g *StepGradient) Complete() bool { return g.sum.n == len(g.refs) }

// Missing returns the windows not yet added, in window order.
func (g *StepGradient) Missing() []WindowRef {
	var out []WindowRef
	for i := g.sum.n; i < len(g.refs); i++ {
		if _, ok := g.pending[i]; !ok {
			out = append(out, g.refs[i])
		}
	}
	return out
}

// mean returns the step's gradient and loss. It divides the sum in place: the second call
// fails.
func (g *StepGradient) mean() ([]float64, float64, error) {
	switch {
	case g.used:
		return nil, 0, fmt.Errorf("%w: step %d was already applied", ErrStepGradient, g.step+1)
	case !g.Complete():
		return nil, 0, fmt.Errorf("%w: step %d lacks windows %v", ErrStepGradient, g.step+1, g.Missing())
	}
	g.used = true
	grad, loss := g.sum.mean()
	return grad, loss, nil
}
