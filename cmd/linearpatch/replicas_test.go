package main

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"linearpatch/worker"
)

// TestSetupConfigKeepsRunReplicas: a run resumed without --replicas keeps the replicas of
// its streams and buckets (before, the default of 1 scaled a 3-replica run down), and an
// explicit --replicas changes them and says so in the log. On a three-node cluster of
// embedded servers.
func TestSetupConfigKeepsRunReplicas(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	const n = 3
	ports := make([]int, n)
	var routes []string
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ports[i] = l.Addr().(*net.TCPAddr).Port
		l.Close()
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", ports[i]))
	}
	var urls []string
	for i := range n {
		e, err := worker.StartEmbedded(ctx, t.TempDir(), worker.WithAllowAnonymous(), worker.WithServerName(fmt.Sprintf("n%d", i)),
			worker.WithCluster("lpr", "127.0.0.1", ports[i], routes), worker.WithServerLogger(slog.New(slog.DiscardHandler)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(e.Shutdown)
		urls = append(urls, e.URL())
	}
	nc, err := worker.Connect(ctx, worker.ConnOptions{URL: strings.Join(urls, ","), ReconnectWait: 50 * time.Millisecond})
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
	var logs bytes.Buffer
	prev := slog.Default()
	defer slog.SetDefault(prev)
	setup := func(args ...string) {
		t.Helper()
		s, err := flagSettings(t, "coordinator", args...)
		if err != nil {
			t.Fatal(err)
		}
		slog.SetDefault(slog.New(slog.NewTextHandler(&logs, nil))) // resolving the flags set it
		for {
			// Until the cluster has a meta leader and knows all three peers, these fail.
			sctx, scancel := context.WithTimeout(ctx, 5*time.Second)
			var sc worker.StreamConfig
			if sc, err = setupConfig(sctx, s, js, names); err == nil {
				err = worker.Setup(sctx, js, names, sc)
			}
			scancel()
			if err == nil {
				return
			}
			if ctx.Err() != nil {
				t.Fatalf("set up with %q: %v", args, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	replicas := func(want int, when string) {
		t.Helper()
		for _, stream := range []string{names.TasksStream(), names.DataStream(), names.DeadStream(), "KV_" + names.KVBucket(), "OBJ_" + names.ObjectStore()} {
			s, err := js.Stream(ctx, stream)
			if err != nil {
				t.Fatal(err)
			}
			if got := s.CachedInfo().Config.Replicas; got != want {
				t.Fatalf("%s: stream %s has %d replicas, want %d", when, stream, got, want)
			}
		}
	}
	setup("--replicas", "3")
	replicas(3, "created with --replicas 3")
	logs.Reset()
	setup()
	replicas(3, "resumed without --replicas")
	if !strings.Contains(logs.String(), "keeps the replicas") || strings.Contains(logs.String(), "changing the replicas") {
		t.Errorf("resumed without --replicas, the log says:\n%s", logs.String())
	}
	logs.Reset()
	setup("--replicas", "1")
	replicas(1, "resumed with --replicas 1")
	if !strings.Contains(logs.String(), "changing the replicas") || !strings.Contains(logs.String(), "from=3 to=1") {
		t.Errorf("an explicit change of replicas is not logged:\n%s", logs.String())
	}
}
