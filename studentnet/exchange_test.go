package studentnet

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"math"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"linearpatch/student"
	"linearpatch/worker"
)

// studentExchange starts an embedded server that requires the run's role keys, sets the
// run up as its coordinator and opens an exchange connected with the student role (so
// the role's permissions are exercised).
func studentExchange(t *testing.T, batch int) (*Exchange, jetstream.JetStream) {
	t.Helper()
	open := studentExchanges(t, batch)
	return open(), nil
}

// studentExchanges is studentExchange returning a function that opens another exchange
// of the run on its own student connection (one per student).
func studentExchanges(t *testing.T, batch int) func() *Exchange {
	t.Helper()
	names, err := worker.NewNames("rshare")
	if err != nil {
		t.Fatal(err)
	}
	creds, err := worker.LoadOrCreateCredentials(filepath.Join(t.TempDir(), "creds"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	e, err := worker.StartEmbedded(ctx, t.TempDir(), worker.WithServerLogger(quiet), worker.WithRoles(creds, names))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Shutdown)
	connect := func(r worker.Role) jetstream.JetStream {
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		defer cancel()
		nc, err := worker.ConnectInProcess(ctx, e, creds, r, worker.ConnOptions{Logger: quiet})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		js, err := jetstream.New(nc)
		if err != nil {
			t.Fatal(err)
		}
		return js
	}
	cjs := connect(worker.RoleCoordinator)
	if err := worker.Setup(ctx, cjs, names, worker.StreamConfig{}); err != nil {
		t.Fatal(err)
	}
	return func() *Exchange {
		x, err := Open(t.Context(), connect(worker.RoleStudent), names, batch)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(x.Close)
		return x
	}
}

// TestExchangeClaims: a claim is created once; renewals and takeovers are by revision (a
// holder whose claim was taken over fails to renew it); a published window's claim is done
// and its gradient comes back bit for bit with its loss and shard, also a gradient of a
// d=1024 patch (4 MiB, chunked by the object store).
func TestExchangeClaims(t *testing.T) {
	x, _ := studentExchange(t, 2)
	ctx := t.Context()
	if _, ok, err := x.Claim(ctx, 0, 1); err != nil || ok {
		t.Fatalf("claim before any: ok %v, %v", ok, err)
	}
	rev, err := x.CreateClaim(ctx, 0, 1, "a")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := x.CreateClaim(ctx, 0, 1, "b"); !errors.Is(err, student.ErrClaimTaken) {
		t.Fatalf("second create: %v, want ErrClaimTaken", err)
	}
	rev2, err := x.UpdateClaim(ctx, 0, 1, "a", rev) // a renews
	if err != nil || rev2 == rev {
		t.Fatalf("renewal: rev %d → %d, %v", rev, rev2, err)
	}
	// b saw rev2 unchanged for a lease: it takes over; a's next renewal fails.
	c, ok, err := x.Claim(ctx, 0, 1)
	if err != nil || !ok || c.Holder != "a" || c.Rev != rev2 || c.Done {
		t.Fatalf("claim %+v ok %v %v", c, ok, err)
	}
	if _, err := x.UpdateClaim(ctx, 0, 1, "b", c.Rev); err != nil {
		t.Fatalf("takeover: %v", err)
	}
	if _, err := x.UpdateClaim(ctx, 0, 1, "a", rev2); !errors.Is(err, student.ErrClaimTaken) {
		t.Fatalf("renewal after the takeover: %v, want ErrClaimTaken", err)
	}
	const d = 1024
	g := make([]float32, d*d)
	for i := range g {
		g[i] = float32(math.Sin(float64(i))) * 1e-3
	}
	g[7] = float32(math.NaN())
	w := student.WindowGrad{Ref: student.WindowRef{Shard: 3, Index: 5}, Grad: g, Loss: 1.0 / 3, ShardSHA256: "abc", Fingerprint: "fp"}
	if err := x.Publish(ctx, 0, 1, "b", w); err != nil {
		t.Fatal(err)
	}
	if c, _, _ := x.Claim(ctx, 0, 1); !c.Done || c.Holder != "b" {
		t.Fatalf("claim after publishing: %+v", c)
	}
	if _, err := x.UpdateClaim(ctx, 0, 1, "b", c.Rev); !errors.Is(err, student.ErrClaimTaken) {
		t.Fatalf("renewal after publishing: %v", err)
	}
	got, err := x.Fetch(ctx, 0, 1, w.Ref)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.EqualFunc(got.Grad, g, func(a, b float32) bool { return math.Float32bits(a) == math.Float32bits(b) }) ||
		math.Float64bits(got.Loss) != math.Float64bits(w.Loss) || got.Ref != w.Ref || got.ShardSHA256 != "abc" || got.Fingerprint != "fp" {
		t.Fatalf("fetched %+v (loss %v), want the published gradient", got.Ref, got.Loss)
	}
	if _, err := x.Fetch(ctx, 0, 1, student.WindowRef{Shard: 3, Index: 6}); err == nil {
		t.Fatal("fetched a gradient as another window's")
	}
	if up, down := x.Bytes(); up != 4*d*d || down != 4*d*d {
		t.Fatalf("bytes up %d, down %d", up, down)
	}
}

// TestExchangeCheckpoints: the latest checkpoint wins whatever the order of the saves; a
// finished one replaces an unfinished one of the same step; saving one of step S deletes
// the claims and gradients of the steps before S−2.
func TestExchangeCheckpoints(t *testing.T) {
	x, _ := studentExchange(t, 1)
	ctx := t.Context()
	if _, err := x.LoadCheckpoint(ctx); !errors.Is(err, student.ErrNoCheckpoint) {
		t.Fatalf("load before any: %v", err)
	}
	ck := func(step int, done bool) *student.Checkpoint {
		return &student.Checkpoint{Step: step, AdamStep: step, Done: done, P: []float32{float32(step)}, M: []float64{0}, V: []float64{0},
			ShardSHA256: map[int]string{}}
	}
	for step := range 6 {
		if _, err := x.CreateClaim(ctx, step, 0, "a"); err != nil {
			t.Fatal(err)
		}
		if err := x.Publish(ctx, step, 0, "a", student.WindowGrad{Grad: []float32{1}}); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range []struct {
		step     int
		done     bool
		wantStep int
		wantDone bool
	}{{2, false, 2, false}, {4, false, 4, false}, {2, false, 4, false}, {4, false, 4, false}, {4, true, 4, true}, {4, false, 4, true}} {
		if err := x.SaveCheckpoint(ctx, ck(s.step, s.done)); err != nil {
			t.Fatal(err)
		}
		step, done, ok, err := x.LatestCheckpoint(ctx)
		if err != nil || !ok || step != s.wantStep || done != s.wantDone {
			t.Fatalf("after saving step %d (done %v): latest %d (done %v, ok %v, %v)", s.step, s.done, step, done, ok, err)
		}
		got, err := x.LoadCheckpoint(ctx)
		if err != nil || got.Step != s.wantStep || got.Done != s.wantDone || got.P[0] != float32(s.wantStep) {
			t.Fatalf("loaded %+v, %v", got, err)
		}
	}
	// Saves at 2 (prunes nothing), then 4 (prunes [0, 2)); the finished 4 prunes no more.
	for step := range 6 {
		_, ok, err := x.Claim(ctx, step, 0)
		if err != nil {
			t.Fatal(err)
		}
		if ok != (step >= 2) {
			t.Errorf("step %d: claim kept %v", step, ok)
		}
		_, err = x.Fetch(ctx, step, 0, student.WindowRef{})
		if (err == nil) != (step >= 2) {
			t.Errorf("step %d: gradient fetch: %v", step, err)
		}
	}
}

// TestExchangeWaitStep: a student waiting on a step wakes when one of its claims changes,
// not after the poll interval; a change of another step does not wake it.
func TestExchangeWaitStep(t *testing.T) {
	open := studentExchanges(t, 2)
	x, y := open(), open()
	ctx := t.Context()
	if err := x.WaitStep(ctx, 3, time.Millisecond); err != nil { // starts the watch
		t.Fatal(err)
	}
	for _, c := range []struct {
		step   int
		wakes  bool
		waitAt time.Duration
	}{{4, false, 700 * time.Millisecond}, {3, true, 20 * time.Second}} {
		done := make(chan time.Duration, 1)
		go func() {
			t0 := time.Now()
			_ = x.WaitStep(ctx, 3, c.waitAt)
			done <- time.Since(t0)
		}()
		time.Sleep(100 * time.Millisecond)
		if _, err := y.CreateClaim(ctx, c.step, 0, "y"); err != nil {
			t.Fatal(err)
		}
		took := <-done
		if c.wakes && took > 10*time.Second || !c.wakes && took < c.waitAt {
			t.Fatalf("a claim of step %d: the wait on step 3 returned after %v (limit %v)", c.step, took, c.waitAt)
		}
	}
}
