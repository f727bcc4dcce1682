package student

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// ErrClaimTaken: a window's claim was not written because it changed since it was read
// (another student created, renewed, took over or finished it).
var ErrClaimTaken = errors.New("student: claim taken")

// Claim is the state of one window of one step in a StepExchange.
type Claim struct {
	Holder string // the student computing the window (or the one that published it)
	Rev    uint64 // changes at every write of the claim: creation, renewal, takeover, Done
	Done   bool   // the window's gradient is published (Fetch returns it)
}

// StepExchange is where students sharing a run meet: the claims on a step's windows (with
// revisions, for leases), the windows' gradients, and the shared checkpoint. A student's
// calls come from one goroutine, except UpdateClaim, which its claim renewer calls
// concurrently with the others. Steps are 0-based, pos is the window's position in the
// step (StepWindows order). The NATS implementation is package studentnet; tests use an
// in-memory one.
type StepExchange interface {
	// Claim reads window pos of step's claim; ok is false when there is none.
	Claim(ctx context.Context, step, pos int) (c Claim, ok bool, err error)
	// CreateClaim claims the window for holder if nobody has; ErrClaimTaken otherwise.
	CreateClaim(ctx context.Context, step, pos int, holder string) (rev uint64, err error)
	// UpdateClaim rewrites the claim for holder if its revision is still rev (a renewal,
	// or the takeover of an expired claim); ErrClaimTaken otherwise.
	UpdateClaim(ctx context.Context, step, pos int, holder string, rev uint64) (uint64, error)
	// Publish stores g as window pos of step's gradient, then marks its claim Done
	// (whatever its revision: a gradient is the same bits whoever computed it).
	Publish(ctx context.Context, step, pos int, holder string, g WindowGrad) error
	// Fetch returns window pos of step's published gradient (ref is the window it must be).
	Fetch(ctx context.Context, step, pos int, ref WindowRef) (WindowGrad, error)
	// SaveCheckpoint stores ck as the run's latest checkpoint unless one of a later step
	// (or a finished one of the same step) is stored already; then it may delete the claims
	// and gradients of the steps before ck.Step−2 (a joiner starts from the latest
	// checkpoint; a student that finds a window of its step unclaimed while a later
	// checkpoint exists loads that one). Concurrent saves of different steps must leave
	// the latest.
	SaveCheckpoint(ctx context.Context, ck *Checkpoint) error
	// LatestCheckpoint returns the step of the latest checkpoint and whether it is of a
	// finished run; ok is false when there is none.
	LatestCheckpoint(ctx context.Context) (step int, done bool, ok bool, err error)
	// LoadCheckpoint returns the latest checkpoint (ErrNoCheckpoint when none).
	LoadCheckpoint(ctx context.Context) (*Checkpoint, error)
}

// StepWaiter is implemented by a StepExchange that can wake a waiting student as soon as a
// claim of the step changes (a window published, claimed or renewed), rather than after a
// poll interval.
type StepWaiter interface {
	// WaitStep returns when a claim of step may have changed, after at most d, or when ctx
	// ends (with its error).
	WaitStep(ctx context.Context, step int, d time.Duration) error
}

// SharedOptions configure RunShared.
type SharedOptions struct {
	// Holder names this student in its claims; unique among the students of the run
	// (e.g. host, pid and a random suffix).
	Holder string
	// Lease: a claim whose revision has not changed for this long, on this student's own
	// clock, is taken over (the holder renews every Lease/3). 0: 30s.
	Lease time.Duration
	// Poll is how often the student looks at the exchange while it waits (an exchange that
	// is a StepWaiter wakes it sooner). 0: 250ms.
	Poll time.Duration
	// OnWindow, if set, is called after each window this student computed (for metrics).
	OnWindow func(step, pos int, took time.Duration)
}

// RunShared trains like Run, but shares every step's windows with the other students on
// ex: for each step it claims, in window order, the windows nobody holds (or whose holder
// stopped renewing its claim for a lease), computes them at the step's P with
// WindowGradient and publishes them, then fetches the step's other windows and applies the
// step itself (ApplyStep on the sum in window order). Every student applies every step,
// so all hold the same P and AdamW state with no leader, and the final P is bit-identical
// to Run's with the same configuration, for any number of students, whoever stops or
// joins when (same build, same kind of CPU). Each student also runs the validation passes
// itself (the same numbers everywhere), so curves and early stops are Run's.
//
// It starts from the exchange's latest checkpoint (the trainer's own store is not used):
// the steps after it are replayed from their published gradients, with no recomputation,
// and a student that falls a checkpoint behind loads the newer one. Checkpoints are saved
// to the exchange every CheckpointEvery steps and at the end, by any student that reaches
// them (the exchange keeps the latest). A finished run returns its result at once.
// Errors as Run's, and the exchange's.
func (t *Trainer) RunShared(ctx context.Context, ex StepExchange, o SharedOptions) (*Result, error) {
	defer t.data.Release()
	if ex == nil || o.Holder == "" {
		return nil, fmt.Errorf("%w: RunShared needs an exchange and a holder name", ErrOptions)
	}
	if o.Lease <= 0 {
		o.Lease = 30 * time.Second
	}
	if o.Poll <= 0 {
		o.Poll = 250 * time.Millisecond
	}
	ck, err := t.sharedStart(ctx, ex)
	if err != nil {
		return nil, err
	}
	sh := &sharedRun{t: t, ex: ex, o: o, seen: map[[2]int]seenClaim{}}
	rctx, stop := context.WithCancel(ctx)
	defer stop()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); sh.renew(rctx) }()
	defer wg.Wait()
	defer stop()
	return t.loop(ctx, ck, loopHooks{
		step: sh.step,
		// A failed save is not fatal: another student, or this one at the next checkpoint,
		// saves a later one (until then a joiner replays more steps).
		save: func(ctx context.Context, ck *Checkpoint) error {
			if err := ex.SaveCheckpoint(ctx, ck); err != nil {
				if ctx.Err() != nil {
					return err
				}
				t.log.Warn("student: saving the shared checkpoint failed", "step", ck.Step, "err", err)
			}
			return nil
		},
		before: func(ctx context.Context, ck *Checkpoint) (*Checkpoint, error) {
			step, _, ok, err := ex.LatestCheckpoint(ctx)
			if err != nil || !ok || step <= ck.Step {
				return ck, err
			}
			t.log.Info("student: a newer checkpoint is stored; loading it", "step", step, "at", ck.Step)
			return t.sharedStart(ctx, ex)
		},
	})
}

// sharedStart loads the exchange's latest checkpoint, or builds the state at P0.
func (t *Trainer) sharedStart(ctx context.Context, ex StepExchange) (*Checkpoint, error) {
	ck, err := ex.LoadCheckpoint(ctx)
	switch {
	case errors.Is(err, ErrNoCheckpoint):
		return t.start(ctx, false)
	case err != nil:
		return nil, err
	}
	if err := t.check(ck); err != nil {
		return nil, err
	}
	t.log.Info("student: resuming", "step", ck.Step, "of", t.total, "done", ck.Done, "from", "the shared checkpoint")
	return ck, nil
}

// sharedRun is one student's state in RunShared.
type sharedRun struct {
	t  *Trainer
	ex StepExchange
	o  SharedOptions

	mu   sync.Mutex
	held map[[2]int]uint64 // claims this student holds (step, pos) → revision, renewed

	seen map[[2]int]seenClaim // others' claims: the revision and when it was first seen, local clock
}

type seenClaim struct {
	rev   uint64
	since time.Time
}

// renew rewrites the held claims every Lease/3 until ctx ends; a claim that changed
// (finished or taken over) is dropped.
func (sh *sharedRun) renew(ctx context.Context) {
	tick := time.NewTicker(sh.o.Lease / 3)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		sh.mu.Lock()
		held := make(map[[2]int]uint64, len(sh.held))
		for k, v := range sh.held {
			held[k] = v
		}
		sh.mu.Unlock()
		for k, rev := range held {
			nrev, err := sh.ex.UpdateClaim(ctx, k[0], k[1], sh.o.Holder, rev)
			sh.mu.Lock()
			if _, still := sh.held[k]; still {
				switch {
				case err == nil:
					sh.held[k] = nrev
				case errors.Is(err, ErrClaimTaken):
					delete(sh.held, k)
				default:
					sh.t.log.Warn("student: renewing a claim failed", "step", k[0]+1, "window", k[1], "err", err)
				}
			}
			sh.mu.Unlock()
		}
	}
}

func (sh *sharedRun) hold(k [2]int, rev uint64) {
	sh.mu.Lock()
	if sh.held == nil {
		sh.held = map[[2]int]uint64{}
	}
	sh.held[k] = rev
	sh.mu.Unlock()
}

func (sh *sharedRun) release(k [2]int) {
	sh.mu.Lock()
	delete(sh.held, k)
	sh.mu.Unlock()
}

// errBehind: the step's gradients were deleted after a newer checkpoint; the loop loads it.
var errBehind = errors.New("student: a newer checkpoint replaced this step")

// maxFetchFailures is how many times in a row a published gradient may fail to be read
// before the step fails.
const maxFetchFailures = 20

// step runs step ck.Step with the other students and advances ck.
func (sh *sharedRun) step(ctx context.Context, ck *Checkpoint) (ProgressInfo, error) {
	t, ex := sh.t, sh.ex
	step := ck.Step
	refs := t.StepWindows(step)
	g := NewStepGradient(step, refs, len(ck.P))
	have := make([]bool, len(refs))
	failures := 0
	for {
		progressed := false
		for pos, ref := range refs {
			if have[pos] {
				continue
			}
			if err := ctx.Err(); err != nil {
				return ProgressInfo{}, fmt.Errorf("student: step %d interrupted: %w", step+1, err)
			}
			k := [2]int{step, pos}
			c, ok, err := ex.Claim(ctx, step, pos)
			if err != nil {
				return ProgressInfo{}, fmt.Errorf("student: step %d, window %d: reading its claim: %w", step+1, pos, err)
			}
			if ok && c.Done {
				w, err := ex.Fetch(ctx, step, pos, ref)
				if err != nil {
					if ctx.Err() != nil {
						return ProgressInfo{}, ctx.Err()
					}
					if latest, _, has, lerr := ex.LatestCheckpoint(ctx); lerr == nil && has && latest > step {
						return ProgressInfo{}, errBehind // deleted after a newer checkpoint
					}
					if failures++; failures >= maxFetchFailures {
						return ProgressInfo{}, fmt.Errorf("student: step %d, window %d: %w", step+1, pos, err)
					}
					t.log.Debug("student: fetching a published gradient failed; retrying", "step", step+1, "window", pos, "err", err)
					continue
				}
				failures = 0
				if w.Fingerprint != t.fpHash {
					return ProgressInfo{}, fmt.Errorf("%w: window %d of step %d was computed by %s under fingerprint %q, this student's is %q (another build, configuration, data or P0): the students of a run must agree",
						ErrCheckpointMismatch, pos, step+1, c.Holder, w.Fingerprint, t.fpHash)
				}
				if err := g.Add(w); err != nil {
					return ProgressInfo{}, err
				}
				have[pos], progressed = true, true
				delete(sh.seen, k)
				continue
			}
			var rev uint64
			switch {
			case !ok:
				// No claim: not yet claimed, or deleted with the gradients of the steps
				// before a newer checkpoint (this student fell behind): then load that one
				// rather than recompute.
				if latest, _, has, err := ex.LatestCheckpoint(ctx); err != nil {
					return ProgressInfo{}, err
				} else if has && latest > step {
					return ProgressInfo{}, errBehind
				}
				rev, err = ex.CreateClaim(ctx, step, pos, sh.o.Holder)
			default:
				s, known := sh.seen[k]
				if !known || s.rev != c.Rev {
					sh.seen[k] = seenClaim{rev: c.Rev, since: time.Now()}
					continue
				}
				if time.Since(s.since) < sh.o.Lease {
					continue
				}
				t.log.Info("student: taking over a window whose claim expired", "step", step+1, "window", pos, "holder", c.Holder)
				rev, err = ex.UpdateClaim(ctx, step, pos, sh.o.Holder, c.Rev)
			}
			if errors.Is(err, ErrClaimTaken) {
				continue
			}
			if err != nil {
				return ProgressInfo{}, fmt.Errorf("student: step %d, window %d: claiming it: %w", step+1, pos, err)
			}
			delete(sh.seen, k)
			sh.hold(k, rev)
			began := time.Now()
			w, err := t.WindowGradient(ctx, ck.P, ref)
			if err == nil {
				err = ex.Publish(ctx, step, pos, sh.o.Holder, w)
			}
			sh.release(k)
			if err != nil {
				return ProgressInfo{}, fmt.Errorf("student: step %d, window %d: %w", step+1, pos, err)
			}
			if sh.o.OnWindow != nil {
				sh.o.OnWindow(step, pos, time.Since(began))
			}
			if err := g.Add(w); err != nil {
				return ProgressInfo{}, err
			}
			have[pos], progressed = true, true
			break // back to the first missing window: claims go in window order
		}
		if g.Complete() {
			return t.ApplyStep(ck, g)
		}
		if !progressed {
			wait := sleepCtx
			if w, ok := ex.(StepWaiter); ok {
				wait = func(ctx context.Context, d time.Duration) error { return w.WaitStep(ctx, step, d) }
			}
			if err := wait(ctx, sh.o.Poll); err != nil {
				return ProgressInfo{}, fmt.Errorf("student: step %d interrupted: %w", step+1, err)
			}
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-tm.C:
		return nil
	}
}
