package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"linearpatch/student"
	"linearpatch/worker"
)

// flakyExchange fails its first fails calls of each method with err, then answers.
type flakyExchange struct {
	student.StepExchange // nil: only the methods below are called
	err                  error
	fails                int
	calls                map[string]int
	waited               int
}

func (f *flakyExchange) call(op string) error {
	f.calls[op]++
	if f.calls[op] <= f.fails {
		return f.err
	}
	return nil
}

func (f *flakyExchange) Claim(context.Context, int, int) (student.Claim, bool, error) {
	if err := f.call("claim"); err != nil {
		return student.Claim{}, false, err
	}
	return student.Claim{Holder: "h", Rev: 7}, true, nil
}

func (f *flakyExchange) CreateClaim(context.Context, int, int, string) (uint64, error) {
	if err := f.call("create"); err != nil {
		return 0, err
	}
	return 3, nil
}

func (f *flakyExchange) Publish(context.Context, int, int, string, student.WindowGrad) error {
	return f.call("publish")
}

func (f *flakyExchange) WaitStep(context.Context, int, time.Duration) error {
	f.waited++
	return nil
}

// TestRetryingExchange: the network student's exchange calls are retried through transient
// failures (a server restarting), returned at once on others (a claim taken), and given up
// after retryFor; a StepWaiter's watch is passed through.
func TestRetryingExchange(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctx := context.Background()

	f := &flakyExchange{err: nats.ErrTimeout, fails: 2, calls: map[string]int{}}
	x := retryingExchange{ex: f, log: log, retryFor: time.Minute}
	c, ok, err := x.Claim(ctx, 1, 0)
	if err != nil || !ok || c.Rev != 7 || f.calls["claim"] != 3 {
		t.Fatalf("claim through two timeouts: %+v %v %v after %d calls", c, ok, err, f.calls["claim"])
	}
	if rev, err := x.CreateClaim(ctx, 1, 0, "h"); err != nil || rev != 3 {
		t.Fatalf("create claim through two timeouts: %d %v", rev, err)
	}
	if err := x.Publish(ctx, 1, 0, "h", student.WindowGrad{}); err != nil || f.calls["publish"] != 3 {
		t.Fatalf("publish through two timeouts: %v after %d calls", err, f.calls["publish"])
	}
	if err := x.WaitStep(ctx, 1, time.Hour); err != nil || f.waited != 1 {
		t.Fatalf("WaitStep not passed to the inner exchange's watch: %v, %d waits", err, f.waited)
	}

	f = &flakyExchange{err: student.ErrClaimTaken, fails: 5, calls: map[string]int{}}
	x = retryingExchange{ex: f, log: log, retryFor: time.Minute}
	if _, err := x.CreateClaim(ctx, 1, 0, "h"); !errors.Is(err, student.ErrClaimTaken) || f.calls["create"] != 1 {
		t.Fatalf("a taken claim: %v after %d calls, want ErrClaimTaken after one", err, f.calls["create"])
	}

	f = &flakyExchange{err: nats.ErrConnectionReconnecting, fails: 1000, calls: map[string]int{}}
	x = retryingExchange{ex: f, log: log, retryFor: 300 * time.Millisecond}
	began := time.Now()
	if err := x.Publish(ctx, 1, 0, "h", student.WindowGrad{}); !errors.Is(err, nats.ErrConnectionReconnecting) {
		t.Fatalf("an outage longer than retryFor: %v", err)
	}
	if took := time.Since(began); took > 5*time.Second || f.calls["publish"] < 2 {
		t.Fatalf("gave up after %v and %d calls", took, f.calls["publish"])
	}

	cctx, cancel := context.WithCancel(ctx)
	cancel()
	f = &flakyExchange{err: nats.ErrTimeout, fails: 1000, calls: map[string]int{}}
	x = retryingExchange{ex: f, log: log, retryFor: time.Minute}
	if _, _, err := x.Claim(cctx, 1, 0); err == nil || f.calls["claim"] != 1 {
		t.Fatalf("a cancelled context: %v after %d calls", err, f.calls["claim"])
	}
}

// TestReadRunObjectRetries: a read of the run's object while its server is away (restarting,
// or a cluster electing the object store's leader) waits for it rather than failing the
// run; a missing object fails at once.
func TestReadRunObjectRetries(t *testing.T) {
	port, dir := freePort(t), t.TempDir()
	s := startTestServer(t, &server.Options{Port: port, JetStream: true, StoreDir: dir})
	nc, err := nats.Connect(s.ClientURL(), nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	names, err := worker.NewNames("r0123456789abcdef01234567")
	if err != nil {
		t.Fatal(err)
	}
	// No deadline, as a command's context: each request then gets the client's own timeout.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	watchdog := time.AfterFunc(time.Minute, cancel)
	defer watchdog.Stop()
	obj, err := js.CreateObjectStore(ctx, jetstream.ObjectStoreConfig{Bucket: names.ObjectStore(), Storage: jetstream.FileStorage})
	if err != nil {
		t.Fatal(err)
	}
	want := []byte("the training-free patch")
	if _, err := obj.PutBytes(ctx, "patch0", want); err != nil {
		t.Fatal(err)
	}
	if _, err := readRunObject(ctx, js, names, "missing"); !errors.Is(err, jetstream.ErrObjectNotFound) {
		t.Fatalf("missing object: %v, want ErrObjectNotFound", err)
	}

	s.Shutdown()
	s.WaitForShutdown()
	const away = 6 * time.Second // longer than the client's request timeout (5 s): a read must retry
	restart := time.AfterFunc(away, func() {
		s2, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: port, JetStream: true, StoreDir: dir, NoLog: true, NoSigs: true})
		if err != nil {
			cancel() // the read then fails, naming the context
			return
		}
		t.Cleanup(s2.Shutdown)
		go s2.Start()
	})
	defer restart.Stop()
	began := time.Now()
	got, err := readRunObject(ctx, js, names, "patch0")
	if err != nil {
		t.Fatalf("read across the server's restart: %v", err)
	}
	if string(got) != string(want) {
		t.Fatalf("read %q, want %q", got, want)
	}
	if d := time.Since(began); d < away {
		t.Fatalf("read in %v while the server was away for %v", d, away)
	}
}
