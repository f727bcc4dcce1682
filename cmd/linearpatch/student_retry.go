package main

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"linearpatch/student"
	"linearpatch/worker"
)

// retryingExchange retries the transient failures of a student's calls on the run's
// exchange (the server restarting, a reply lost while the client reconnected: what
// worker.Transient names) until a call succeeds or fails otherwise, its context ends, or
// it has failed for retryFor. Without it a student stopped at its first request to a
// server that was restarting (the coordinator's embedded one, restarted with it).
//
// A claim created or renewed whose reply was lost is retried and then finds the claim
// taken (by this student): RunShared treats it as another's and takes it over once the
// lease has passed, which costs a lease, not a wrong result.
type retryingExchange struct {
	ex       student.StepExchange
	log      *slog.Logger
	retryFor time.Duration
}

func retryCall[T any](ctx context.Context, x retryingExchange, op string, f func() (T, error)) (T, error) {
	return retryTransient(ctx, x.log, x.retryFor, "student: a request to the run's exchange failed; retrying", f, "op", op)
}

// retryTransient calls f until it succeeds, fails otherwise than transiently
// (worker.Transient), ctx ends, or it has failed for retryFor; each retry is logged at WARN
// as msg with attrs and the error.
func retryTransient[T any](ctx context.Context, log *slog.Logger, retryFor time.Duration, msg string, f func() (T, error), attrs ...any) (T, error) {
	give := time.Now().Add(retryFor)
	wait := 100 * time.Millisecond
	for {
		v, err := f()
		if err == nil || !worker.Transient(err) || ctx.Err() != nil || time.Now().After(give) {
			return v, err
		}
		log.Warn(msg, append(attrs[:len(attrs):len(attrs)], "err", err)...)
		if serr := worker.SleepCtx(ctx, wait); serr != nil {
			return v, err
		}
		wait = min(2*wait, 2*time.Second)
	}
}

// objectRetryFor is how long a read of one of the run's objects is retried while the
// server does not answer (a restart, or a JetStream cluster electing the object store's
// new leader after its leader died).
const objectRetryFor = 2 * time.Minute

// readRunObject reads object name of the run's object store whole, retrying transient
// failures for objectRetryFor. Errors wrap jetstream.ErrObjectNotFound when there is no
// such object.
func readRunObject(ctx context.Context, js jetstream.JetStream, names worker.Names, name string) ([]byte, error) {
	return retryTransient(ctx, slog.Default(), objectRetryFor, "reading an object of the run failed; retrying", func() ([]byte, error) {
		obj, err := js.ObjectStore(ctx, names.ObjectStore())
		if err != nil {
			return nil, fmt.Errorf("object store: %w", err)
		}
		b, _, err := worker.GetObject(ctx, obj, name)
		return b, err
	}, "object", name)
}

type claimResult struct {
	c  student.Claim
	ok bool
}

func (x retryingExchange) Claim(ctx context.Context, step, pos int) (student.Claim, bool, error) {
	r, err := retryCall(ctx, x, "claim", func() (claimResult, error) {
		c, ok, err := x.ex.Claim(ctx, step, pos)
		return claimResult{c, ok}, err
	})
	return r.c, r.ok, err
}

func (x retryingExchange) CreateClaim(ctx context.Context, step, pos int, holder string) (uint64, error) {
	return retryCall(ctx, x, "create claim", func() (uint64, error) { return x.ex.CreateClaim(ctx, step, pos, holder) })
}

func (x retryingExchange) UpdateClaim(ctx context.Context, step, pos int, holder string, rev uint64) (uint64, error) {
	return retryCall(ctx, x, "update claim", func() (uint64, error) { return x.ex.UpdateClaim(ctx, step, pos, holder, rev) })
}

func (x retryingExchange) Publish(ctx context.Context, step, pos int, holder string, g student.WindowGrad) error {
	_, err := retryCall(ctx, x, "publish", func() (struct{}, error) { return struct{}{}, x.ex.Publish(ctx, step, pos, holder, g) })
	return err
}

func (x retryingExchange) Fetch(ctx context.Context, step, pos int, ref student.WindowRef) (student.WindowGrad, error) {
	return retryCall(ctx, x, "fetch", func() (student.WindowGrad, error) { return x.ex.Fetch(ctx, step, pos, ref) })
}

func (x retryingExchange) SaveCheckpoint(ctx context.Context, ck *student.Checkpoint) error {
	_, err := retryCall(ctx, x, "save checkpoint", func() (struct{}, error) { return struct{}{}, x.ex.SaveCheckpoint(ctx, ck) })
	return err
}

type latestResult struct {
	step     int
	done, ok bool
}

func (x retryingExchange) LatestCheckpoint(ctx context.Context) (int, bool, bool, error) {
	r, err := retryCall(ctx, x, "latest checkpoint", func() (latestResult, error) {
		step, done, ok, err := x.ex.LatestCheckpoint(ctx)
		return latestResult{step, done, ok}, err
	})
	return r.step, r.done, r.ok, err
}

func (x retryingExchange) LoadCheckpoint(ctx context.Context) (*student.Checkpoint, error) {
	return retryCall(ctx, x, "load checkpoint", func() (*student.Checkpoint, error) { return x.ex.LoadCheckpoint(ctx) })
}

// WaitStep passes the inner exchange's student.StepWaiter through (its watch wakes a
// waiting student at once), or sleeps d. It retries nothing: a wait returns no transient
// error.
func (x retryingExchange) WaitStep(ctx context.Context, step int, d time.Duration) error {
	if w, ok := x.ex.(student.StepWaiter); ok {
		return w.WaitStep(ctx, step, d)
	}
	return worker.SleepCtx(ctx, d)
}

var (
	_ student.StepExchange = retryingExchange{}
	_ student.StepWaiter   = retryingExchange{}
)
