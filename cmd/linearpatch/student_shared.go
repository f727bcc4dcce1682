package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"linearpatch/student"
	"linearpatch/studentnet"
	"linearpatch/worker"
)

// Students sharing a run's steps: every network student (and `run --students N` with
// N > 1) trains through student.Trainer.RunShared on the run's studentnet.Exchange, so one
// student and many give the same P bit for bit.

// sharedDistill is what distill needs to share the steps.
type sharedDistill struct {
	ex   student.StepExchange
	opts student.SharedOptions
}

// sharedStudent is one student sharing a run's steps: its exchange, and the report it
// refreshes under students.live.<holder> every lease/3 (for status and for the others'
// count of live students).
type sharedStudent struct {
	sharedDistill
	x   *studentnet.Exchange
	kv  jetstream.KeyValue
	log *slog.Logger

	mu     sync.Mutex
	report studentnet.Report
	cancel context.CancelFunc
	done   chan struct{}
}

// newHolder returns a unique name for a student's claims: host, pid and a random suffix.
func newHolder() string {
	host, _ := os.Hostname()
	var b [3]byte
	_, _ = rand.Read(b[:])
	return studentnet.HolderKey(fmt.Sprintf("%s-%d-%s", host, os.Getpid(), hex.EncodeToString(b[:])))
}

// joinShared opens the run's exchange for a student with the run's batch, starts its
// report and says when the run has no window left for it (more live students than
// windows per step): it then idles (applying the steps the others compute) until one
// drops out. --student-lease and --threads are read from s.
func joinShared(ctx context.Context, s settings, js jetstream.JetStream, kv jetstream.KeyValue, names worker.Names,
	cfg student.TrainConfig, log *slog.Logger) (*sharedStudent, error) {
	lease := s.v.GetDuration("student-lease")
	if lease <= 0 {
		return nil, fmt.Errorf("--student-lease %v must be positive", lease)
	}
	if n := s.num("threads"); n > 0 {
		runtime.GOMAXPROCS(n)
	}
	return startShared(ctx, js, kv, names, cfg, lease, newHolder(), log)
}

func startShared(ctx context.Context, js jetstream.JetStream, kv jetstream.KeyValue, names worker.Names,
	cfg student.TrainConfig, lease time.Duration, holder string, log *slog.Logger) (*sharedStudent, error) {
	x, err := studentnet.Open(ctx, js, names, cfg.Batch)
	if err != nil {
		return nil, err
	}
	host, _ := os.Hostname()
	sh := &sharedStudent{x: x, kv: kv, log: log, done: make(chan struct{}),
		report: studentnet.Report{Holder: holder, Host: host, PID: os.Getpid(), State: "joining", Lease: lease.Seconds()}}
	sh.ex = retryingExchange{ex: x, log: log, retryFor: 2 * time.Minute}
	sh.opts = student.SharedOptions{Holder: holder, Lease: lease, Poll: netPoll, OnWindow: func(step, pos int, took time.Duration) {
		// (TestDataParallelStudents reads this line: which student computed which window.)
		log.Debug("student: window computed", "step", step+1, "window", pos, "took", took)
		sh.mu.Lock()
		sh.report.Windows++
		sh.mu.Unlock()
	}}
	if reps, err := studentnet.Reports(ctx, kv); err == nil {
		live := 0
		now := time.Now()
		for _, r := range reps {
			if r.Holder != holder && r.Live(now) && (r.State == "joining" || r.State == "training") {
				live++
			}
		}
		if live >= cfg.Batch {
			log.Warn(fmt.Sprintf("the run has %d windows per step (--batch) and %d live students: this student will idle (applying the steps the others compute) until one drops out", cfg.Batch, live))
		}
	}
	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	sh.cancel = cancel
	sh.put(rctx)
	go func() {
		defer close(sh.done)
		t := time.NewTicker(lease / 3)
		defer t.Stop()
		for {
			select {
			case <-rctx.Done():
				return
			case <-t.C:
				sh.put(rctx)
			}
		}
	}()
	return sh, nil
}

func (sh *sharedStudent) put(ctx context.Context) {
	sh.mu.Lock()
	r := sh.report
	sh.mu.Unlock()
	r.Updated = time.Now().UTC()
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := studentnet.PutReport(pctx, sh.kv, r); err != nil && ctx.Err() == nil {
		sh.log.Debug("student report not stored", "err", err)
	}
}

// progress wraps a progress hook to keep the report's step, loss and rates.
func (sh *sharedStudent) progress(next func(student.ProgressInfo)) func(student.ProgressInfo) {
	return func(pi student.ProgressInfo) {
		sh.mu.Lock()
		sh.report.State, sh.report.Step, sh.report.TotalSteps, sh.report.Loss = "training", pi.Step, pi.TotalSteps, pi.Loss
		sh.report.TokensPerSec, sh.report.ETASeconds = pi.TokensPerSec, pi.ETA.Seconds()
		sh.mu.Unlock()
		if next != nil {
			next(pi)
		}
	}
}

// state records the student's final state in its report.
func (sh *sharedStudent) state(ctx context.Context, st string) {
	sh.mu.Lock()
	sh.report.State = st
	sh.mu.Unlock()
	sh.put(ctx)
}

// finish records that the student ended with the run at step steps.
func (sh *sharedStudent) finish(ctx context.Context, steps int) {
	sh.mu.Lock()
	sh.report.Step = steps
	sh.mu.Unlock()
	sh.state(ctx, "done")
}

// stop ends the report's refreshes.
func (sh *sharedStudent) stop() {
	sh.cancel()
	<-sh.done
	sh.x.Close()
}

// addRunStudentsFlag declares run's --students.
func addRunStudentsFlag(cmd *cobra.Command) {
	cmd.Flags().Int("students", 1, "students in this process sharing every step's windows (needs --batch ≥ students; the result is the same bit for bit)")
}

// checkRunStudents refuses --students below 1 or above --batch (a step has --batch windows
// to share).
func checkRunStudents(s settings) error {
	n, batch := s.num("students"), s.num("batch")
	switch {
	case n < 1:
		return fmt.Errorf("--students %d: must be at least 1", n)
	case n > 1 && batch < n:
		return fmt.Errorf("--students %d with --batch %d: each step has only %d windows to share between the students; give --batch ≥ %d (the result does not depend on the number of students, only on --batch)",
			n, batch, batch, n)
	}
	return nil
}

// inProcessLease is the claim lease of run's in-process students (they stop together).
const inProcessLease = 30 * time.Second

// distillShared runs n students in this process that share every step's windows through
// the run's exchange on js (run --students n, n > 1), each with its own suffix, data and
// trainer. Student 0 reports progress and metrics and keeps the curve in base's directory,
// the others in student-<i> below it. All must end with the same P (they apply the same
// steps); the result is student 0's.
func distillShared(ctx context.Context, n int, js jetstream.JetStream, kv jetstream.KeyValue, names worker.Names, base distillSpec) (*distillResult, error) {
	results := make([]*distillResult, n)
	g, gctx := errgroup.WithContext(ctx)
	holder := newHolder()
	for i := range n {
		g.Go(func() error {
			log := base.log.With("student", i)
			sh, err := startShared(gctx, js, kv, names, base.cfg, inProcessLease, fmt.Sprintf("%s-s%d", holder, i), log)
			if err != nil {
				return err
			}
			defer sh.stop()
			spec := base
			spec.log, spec.shared = log, &sh.sharedDistill
			spec.progress = sh.progress(nil)
			if i == 0 {
				spec.progress = sh.progress(base.progress)
			} else {
				spec.metrics = nil
				spec.workDir = filepath.Join(studentDir(base.runDir), fmt.Sprintf("student-%d", i))
			}
			r, err := distill(gctx, spec)
			if err != nil {
				sh.state(context.WithoutCancel(gctx), "failed: "+err.Error())
				return fmt.Errorf("student %d: %w", i, err)
			}
			sh.finish(gctx, r.Result.Steps)
			results[i] = r
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	for i, r := range results[1:] {
		if !slices.Equal(r.P.Data, results[0].P.Data) {
			return nil, fmt.Errorf("students 0 and %d ended with different patches (a bug: they apply the same steps)", i+1)
		}
	}
	return results[0], nil
}

// studentsJSON is status's view of the students sharing the steps.
type studentsJSON struct {
	Live    int                 `json:"live"`
	Reports []studentnet.Report `json:"reports"`
}

// readStudents returns the students' reports in the run's bucket (nil when none).
func readStudents(ctx context.Context, kv jetstream.KeyValue, now time.Time) *studentsJSON {
	reps, err := studentnet.Reports(ctx, kv)
	if err != nil || len(reps) == 0 {
		return nil
	}
	v := &studentsJSON{Reports: reps}
	for _, r := range reps {
		if r.Live(now) && r.State != "done" && !strings.HasPrefix(r.State, "failed") {
			v.Live++
		}
	}
	return v
}

// printStudents prints status's table of the students sharing the steps.
func printStudents(w io.Writer, v *studentsJSON) {
	if v == nil {
		return
	}
	now := time.Now()
	fmt.Fprintf(w, "\nstudents: %d live of %d reported\n", v.Live, len(v.Reports))
	fmt.Fprintln(w, "| student | state | step | loss | tokens/s | windows | ETA | last seen |")
	fmt.Fprintln(w, "|---|---|---:|---:|---:|---:|---|---|")
	for _, r := range v.Reports {
		state := r.State
		if !r.Live(now) && r.State != "done" {
			state += " (gone)"
		}
		fmt.Fprintf(w, "| %s | %s | %d/%d | %.5f | %.0f | %d | %s | %s ago |\n", r.Holder, state, r.Step, r.TotalSteps, r.Loss,
			r.TokensPerSec, r.Windows, (time.Duration(r.ETASeconds * float64(time.Second))).Round(time.Second),
			now.Sub(r.Updated).Round(time.Second))
	}
}
