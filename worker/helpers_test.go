package worker

import (
	"context"
	"io"
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"
)

// testLogger writes to stderr under -v and nowhere otherwise (client handlers
// may log after a test has returned, so t.Log is not safe).
func testLogger() *slog.Logger {
	var w io.Writer = io.Discard
	if testing.Verbose() {
		w = os.Stderr
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// startServer starts an embedded server on a fresh t.TempDir store, shut down
// at cleanup.
func startServer(t *testing.T, opts ...ServerOption) *Embedded {
	t.Helper()
	return startServerIn(t, t.TempDir(), opts...)
}

func startServerIn(t *testing.T, dir string, opts ...ServerOption) *Embedded {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	opts = append([]ServerOption{WithServerLogger(testLogger()), WithAllowAnonymous()}, opts...)
	e, err := StartEmbedded(ctx, dir, opts...)
	if err != nil {
		t.Fatalf("StartEmbedded: %v", err)
	}
	t.Cleanup(e.Shutdown)
	return e
}

// connect opens a reconnecting client, closed at cleanup.
func connect(t *testing.T, url string) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	nc, err := Connect(ctx, ConnOptions{URL: url, Name: t.Name(), ReconnectWait: 50 * time.Millisecond, Logger: testLogger()})
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatalf("jetstream.New: %v", err)
	}
	return nc, js
}

func testNames(t *testing.T) Names {
	t.Helper()
	n, err := NewNames("run-1")
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// setupRun starts a server, connects and runs Setup with cfg.
func setupRun(t *testing.T, cfg StreamConfig, opts ...ServerOption) (*Embedded, *nats.Conn, jetstream.JetStream, Names) {
	t.Helper()
	e := startServer(t, opts...)
	nc, js := connect(t, e.URL())
	names := testNames(t)
	if err := Setup(t.Context(), js, names, cfg); err != nil {
		t.Fatalf("Setup: %v", err)
	}
	return e, nc, js, names
}

// runLoops runs the loops until the test ends and checks they returned nil.
func runLoops(t *testing.T, loops ...*TaskLoop) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	g, ctx := errgroup.WithContext(ctx)
	for _, l := range loops {
		g.Go(func() error { return l.Run(ctx) })
	}
	t.Cleanup(func() {
		cancel()
		if err := g.Wait(); err != nil {
			t.Errorf("TaskLoop.Run: %v", err)
		}
	})
}

// waitFor polls cond until it holds or d passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func streamMsgs(t *testing.T, js jetstream.JetStream, stream string) uint64 {
	t.Helper()
	s, err := js.Stream(t.Context(), stream)
	if err != nil {
		t.Fatalf("stream %s: %v", stream, err)
	}
	info, err := s.Info(t.Context())
	if err != nil {
		t.Fatalf("stream %s info: %v", stream, err)
	}
	return info.State.Msgs
}
