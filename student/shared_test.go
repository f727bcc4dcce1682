package student

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// memExchange is an in-memory StepExchange. killAt, when set, is asked before each
// Publish: true makes the Publish fail without storing anything and the holder die there
// (its claim stays, unrenewed, until a lease takes it over).
type memExchange struct {
	mu      sync.Mutex
	rev     uint64
	claims  map[[2]int]Claim
	grads   map[[2]int]WindowGrad
	ck      []byte
	ckStep  int
	ckDone  bool
	hasCk   bool
	pruned  int // steps below this were deleted
	killAt  func(holder string, step, pos int) bool
	fetched int // gradients fetched (not computed by the fetcher)
}

var errKilled = errors.New("killed")

func newMemExchange() *memExchange {
	return &memExchange{claims: map[[2]int]Claim{}, grads: map[[2]int]WindowGrad{}}
}

func (m *memExchange) Claim(_ context.Context, step, pos int) (Claim, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	c, ok := m.claims[[2]int{step, pos}]
	return c, ok, nil
}

func (m *memExchange) CreateClaim(_ context.Context, step, pos int, holder string) (uint64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	k := [2]int{step, pos}
	if _, ok := m.claims[k]; ok {
		return 0, ErrClaimTaken
	}
	m.rev++
	m.claims[k] = Claim{Holder: holder, Rev: m.rev}
	return m.rev, nil
}

func (m *memExchange) UpdateClaim(_ context.Context, step, pos int, holder string, rev uint64) (uint64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	k := [2]int{step, pos}
	c, ok := m.claims[k]
	if !ok || c.Rev != rev || c.Done {
		return 0, ErrClaimTaken
	}
	m.rev++
	m.claims[k] = Claim{Holder: holder, Rev: m.rev}
	return m.rev, nil
}

func (m *memExchange) Publish(_ context.Context, step, pos int, holder string, g WindowGrad) error {
	if m.killAt != nil && m.killAt(holder, step, pos) {
		return errKilled
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	k := [2]int{step, pos}
	g.Grad = slices.Clone(g.Grad)
	m.grads[k] = g
	m.rev++
	m.claims[k] = Claim{Holder: holder, Rev: m.rev, Done: true}
	return nil
}

func (m *memExchange) Fetch(_ context.Context, step, pos int, ref WindowRef) (WindowGrad, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	g, ok := m.grads[[2]int{step, pos}]
	if !ok || g.Ref != ref {
		return WindowGrad{}, fmt.Errorf("no gradient of window %d of step %d (%+v)", pos, step, ref)
	}
	m.fetched++
	g.Grad = slices.Clone(g.Grad)
	return g, nil
}

func (m *memExchange) SaveCheckpoint(_ context.Context, ck *Checkpoint) error {
	b, err := ck.MarshalBinary()
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.hasCk && (m.ckStep > ck.Step || (m.ckStep == ck.Step && (m.ckDone || !ck.Done))) {
		return nil
	}
	m.pruned = max(m.pruned, ck.Step-2)
	for k := range m.claims {
		if k[0] < m.pruned {
			delete(m.claims, k)
			delete(m.grads, k)
		}
	}
	m.ck, m.ckStep, m.ckDone, m.hasCk = b, ck.Step, ck.Done, true
	return nil
}

func (m *memExchange) LatestCheckpoint(context.Context) (int, bool, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.ckStep, m.ckDone, m.hasCk, nil
}

func (m *memExchange) LoadCheckpoint(context.Context) (*Checkpoint, error) {
	m.mu.Lock()
	b := m.ck
	m.mu.Unlock()
	if b == nil {
		return nil, ErrNoCheckpoint
	}
	return UnmarshalCheckpoint(b)
}

// runStudents runs n students on ex until each returns a result; kill decides, per
// student run, whether it is killed (ctx cancelled) after a given number of steps done
// in that run (0: never). A killed student is replaced by a fresh one (new trainer, new
// holder name). It returns the results of the runs that finished.
func runStudents(t *testing.T, fx *fixture, cfg TrainConfig, ex *memExchange, n int, lease time.Duration, killAfter func(slot, life int) int) ([]*Result, int) {
	t.Helper()
	var wg sync.WaitGroup
	var computed atomic.Int64
	results := make([]*Result, n)
	errs := make([]error, n)
	for slot := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for life := 0; ; life++ {
				if life > 50 {
					errs[slot] = errors.New("too many lives")
					return
				}
				ctx, cancel := context.WithCancel(context.Background())
				k := 0
				if killAfter != nil {
					k = killAfter(slot, life)
				}
				done := 0
				tr := fx.trainer(t, cfg, nil, WithProgress(func(ProgressInfo) {
					if done++; k > 0 && done == k {
						cancel()
					}
				}))
				res, err := tr.RunShared(ctx, ex, SharedOptions{Holder: fmt.Sprintf("s%d.%d", slot, life), Lease: lease, Poll: 2 * time.Millisecond,
					OnWindow: func(int, int, time.Duration) { computed.Add(1) }})
				cancel()
				switch {
				case err == nil:
					results[slot] = res
					return
				case errors.Is(err, context.Canceled) || errors.Is(err, errKilled):
					continue
				default:
					errs[slot] = err
					return
				}
			}
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	return results, int(computed.Load())
}

// TestRunSharedBitIdentical: 1, 2 and 3 students sharing the steps (batch 3, validation,
// checkpoints every 4 steps) end with Run's P, best P and curves, bit for bit; with one
// student nothing is fetched, with more the windows are split.
func TestRunSharedBitIdentical(t *testing.T) {
	fx := newFixture(t, t.TempDir(), defaultFixture())
	cfg := testConfig()
	cfg.Batch = 3
	want, err := fx.trainer(t, cfg, nil).Run(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	for n := 1; n <= 3; n++ {
		ex := newMemExchange()
		results, computed := runStudents(t, fx, cfg, ex, n, time.Second, nil)
		for i, got := range results {
			sameResult(t, fmt.Sprintf("%d students, student %d", n, i), got, want)
		}
		// Every window once: claims are exclusive, and a student that falls behind replays
		// the others' gradients (or loads a newer checkpoint) instead of recomputing.
		if windows := cfg.Epochs * 18; computed != windows {
			t.Fatalf("%d students computed %d windows, the run has %d", n, computed, windows)
		}
		if (n == 1) != (ex.fetched == 0) {
			t.Fatalf("%d students fetched %d gradients", n, ex.fetched)
		}
		if ex.pruned == 0 {
			t.Fatalf("%d students: no gradients were deleted after checkpoints", n)
		}
	}
}

// TestRunSharedKills: students killed at seeded points, between steps (context
// cancelled) or in the middle of a window (they die before publishing it, leaving their
// claim to expire), and replaced by fresh ones that join from the shared checkpoint, end
// with Run's P bit for bit.
func TestRunSharedKills(t *testing.T) {
	fx := newFixture(t, t.TempDir(), defaultFixture())
	cfg := testConfig()
	cfg.Batch = 3
	want, err := fx.trainer(t, cfg, nil).Run(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	trials := 4
	if testing.Short() {
		trials = 2
	}
	for trial := range trials {
		rng := rand.New(rand.NewPCG(11, uint64(trial)))
		var mu sync.Mutex
		n := 2 + trial%2
		ex := newMemExchange()
		kills := 0
		ex.killAt = func(holder string, step, pos int) bool {
			mu.Lock()
			defer mu.Unlock()
			if kills < 3 && rng.IntN(12) == 0 {
				kills++
				return true
			}
			return false
		}
		killAfter := func(slot, life int) int {
			mu.Lock()
			defer mu.Unlock()
			if life < 2 && rng.IntN(2) == 0 {
				return 1 + rng.IntN(12)
			}
			return 0
		}
		results, _ := runStudents(t, fx, cfg, ex, n, 60*time.Millisecond, killAfter)
		for i, got := range results {
			sameResult(t, fmt.Sprintf("trial %d, %d students, student %d", trial, n, i), got, want)
		}
		t.Logf("trial %d: %d students, %d killed mid-window", trial, n, kills)
	}
}

// TestRunSharedRefusesOtherFingerprint: a student whose fingerprint differs (another build,
// configuration, data or P0) refuses the gradients of the run's other students.
func TestRunSharedRefusesOtherFingerprint(t *testing.T) {
	fx := newFixture(t, t.TempDir(), defaultFixture())
	cfg := testConfig()
	cfg.CheckpointEvery = 1000 // gradients but no checkpoint
	ex := newMemExchange()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	tr := fx.trainer(t, cfg, nil, cancelAt(3, cancel))
	if _, err := tr.RunShared(ctx, ex, SharedOptions{Holder: "a", Poll: time.Millisecond}); !errors.Is(err, context.Canceled) {
		t.Fatalf("first student: %v", err)
	}
	other := fx.trainer(t, cfg, nil, WithFingerprintExtra(map[string]string{"p0_method": "other"}))
	_, err := other.RunShared(context.Background(), ex, SharedOptions{Holder: "b", Poll: time.Millisecond})
	if !errors.Is(err, ErrCheckpointMismatch) || !strings.Contains(err.Error(), "computed by a") {
		t.Fatalf("a student with another fingerprint: %v", err)
	}
}

// slowFetch delays every Fetch of one student.
type slowFetch struct {
	*memExchange
	d time.Duration
}

func (s slowFetch) Fetch(ctx context.Context, step, pos int, ref WindowRef) (WindowGrad, error) {
	time.Sleep(s.d)
	return s.memExchange.Fetch(ctx, step, pos, ref)
}

// TestRunSharedFallsBehind: a student that joins late and replays slowly while another
// finishes the run (deleting the gradients it replays) loads the newer checkpoints instead
// of recomputing (no window is computed twice), and ends with Run's result.
func TestRunSharedFallsBehind(t *testing.T) {
	fx := newFixture(t, t.TempDir(), defaultFixture())
	cfg := testConfig()
	want, err := fx.trainer(t, cfg, nil).Run(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	ex := newMemExchange()
	var computedB atomic.Int64
	joined := make(chan struct{})
	var once sync.Once
	var resB *Result
	var errB error
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		<-joined
		var logs strings.Builder
		var mu sync.Mutex
		tr := fx.trainer(t, cfg, nil, WithLogger(slog.New(slog.NewTextHandler(&lockedWriter{w: &logs, mu: &mu}, nil))))
		resB, errB = tr.RunShared(context.Background(), slowFetch{ex, 15 * time.Millisecond}, SharedOptions{Holder: "b", Poll: time.Millisecond,
			OnWindow: func(int, int, time.Duration) { computedB.Add(1) }})
		mu.Lock()
		defer mu.Unlock()
		if !strings.Contains(logs.String(), "a newer checkpoint is stored; loading it") {
			errB = errors.Join(errB, fmt.Errorf("the late student never loaded a newer checkpoint:\n%s", logs.String()))
		}
	}()
	trA := fx.trainer(t, cfg, nil, WithProgress(func(p ProgressInfo) {
		if p.Step == 5 {
			once.Do(func() { close(joined) })
		}
		if p.Step > 5 {
			time.Sleep(10 * time.Millisecond) // B's replay starts, then falls behind
		}
	}))
	var computedA atomic.Int64
	resA, err := trA.RunShared(context.Background(), ex, SharedOptions{Holder: "a", Poll: time.Millisecond,
		OnWindow: func(int, int, time.Duration) { computedA.Add(1) }})
	if err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if errB != nil {
		t.Fatal(errB)
	}
	sameResult(t, "the first student", resA, want)
	sameResult(t, "the late student", resB, want)
	if a, b := computedA.Load(), computedB.Load(); a+b != int64(cfg.Epochs*18) {
		t.Fatalf("the students computed %d + %d windows, the run has %d: a window was recomputed", a, b, cfg.Epochs*18)
	}
}

type lockedWriter struct {
	w  io.Writer
	mu *sync.Mutex
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
