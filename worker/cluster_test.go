package worker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"
)

func freeTCPPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func TestWithClusterErrors(t *testing.T) {
	for _, tc := range []struct {
		name          string
		cluster, host string
		port          int
		routes        []string
		want          string
	}{
		{"empty name", "", "127.0.0.1", 6222, nil, "cluster name"},
		{"name with a space", "a b", "127.0.0.1", 6222, nil, "cluster name"},
		{"empty host", "c", "", 6222, nil, "cluster listen host"},
		{"bad port", "c", "127.0.0.1", 70000, nil, "cluster port"},
		{"route scheme", "c", "127.0.0.1", 6222, []string{"http://127.0.0.1:6222"}, "want nats-route://HOST:PORT"},
		{"route without port", "c", "127.0.0.1", 6222, []string{"nats-route://127.0.0.1"}, "want nats-route://HOST:PORT"},
		{"plaintext routes beyond loopback", "c", "0.0.0.0", 0, nil, "beyond loopback"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := StartEmbedded(context.Background(), t.TempDir(), WithAllowAnonymous(), WithCluster(tc.cluster, tc.host, tc.port, tc.routes))
			if !errors.Is(err, ErrInvalidOption) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want ErrInvalidOption saying %q", err, tc.want)
			}
		})
	}
}

// TestEmbeddedCluster: three embedded servers given WithCluster and the same route list
// form one JetStream cluster, on which Setup creates a run with three replicas.
func TestEmbeddedCluster(t *testing.T) {
	const n = 3
	ports := make([]int, n)
	var routes []string
	for i := range ports {
		ports[i] = freeTCPPort(t)
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", ports[i]))
	}
	var urls []string
	for i := range n {
		e := startServer(t, WithServerName(fmt.Sprintf("n%d", i)), WithCluster("lpt", "127.0.0.1", ports[i], routes))
		urls = append(urls, e.URL())
	}
	_, js := connect(t, strings.Join(urls, ","))
	names := testNames(t)
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	var err error
	for ctx.Err() == nil {
		// Until the cluster has a meta leader and knows all three peers, Setup fails.
		sctx, scancel := context.WithTimeout(ctx, 5*time.Second)
		err = Setup(sctx, js, names, StreamConfig{Replicas: n})
		scancel()
		if err == nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("Setup with %d replicas on the cluster: %v", n, err)
	}
	check := func(when string) {
		t.Helper()
		for _, stream := range []string{names.TasksStream(), names.DataStream(), names.DeadStream(), "KV_" + names.KVBucket(), "OBJ_" + names.ObjectStore()} {
			s, err := js.Stream(ctx, stream)
			if err != nil {
				t.Fatal(err)
			}
			info := s.CachedInfo()
			if info.Config.Replicas != n || info.Cluster == nil || info.Cluster.Name != "lpt" || len(info.Cluster.Replicas) != n-1 {
				t.Fatalf("%s: stream %s: replicas %d, cluster %+v", when, stream, info.Config.Replicas, info.Cluster)
			}
		}
	}
	check("created")
	// A resumed run set up without replicas (0) keeps the run's: it is not scaled down to 1.
	if got, ok, err := RunReplicas(ctx, js, names); err != nil || !ok || got != n {
		t.Fatalf("RunReplicas: %d, %v, %v; want %d", got, ok, err, n)
	}
	if err := Setup(ctx, js, names, StreamConfig{}); err != nil {
		t.Fatal(err)
	}
	check("set up again without replicas")
}
