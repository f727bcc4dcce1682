package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"linearpatch/worker"
)

// natsServerArgs are the arguments of a `linearpatch nats-server` process storing under
// dir and serving clients on listen, followed by extra (cluster flags). Every test that
// starts a server process builds its arguments here, so a flag every server needs is
// added in one place.
func natsServerArgs(dir, listen string, extra ...string) []string {
	return append([]string{"nats-server", "--allow-anonymous", "--dir", dir, "--listen", listen}, extra...)
}

// natsCluster is a JetStream cluster of `linearpatch nats-server` processes on loopback.
type natsCluster struct {
	names []string // server names, n0, n1, …
	urls  []string // client URLs, by node
	nodes []*proc
}

// startNATSCluster starts n clustered nats-server processes on loopback ports, each
// routing to all (its own route included), and waits until the cluster can place a
// stream of n replicas.
func startNATSCluster(t *testing.T, dir string, n int) *natsCluster {
	t.Helper()
	c := &natsCluster{}
	clientPorts, routePorts := make([]int, n), make([]int, n)
	var routes []string
	for i := range n {
		clientPorts[i], routePorts[i] = freePort(t), freePort(t)
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", routePorts[i]))
	}
	for i := range n {
		name := fmt.Sprintf("n%d", i)
		args := natsServerArgs(filepath.Join(dir, name), fmt.Sprintf("127.0.0.1:%d", clientPorts[i]),
			"--server-name", name, "--cluster-name", "lpt", "--cluster-listen", fmt.Sprintf("127.0.0.1:%d", routePorts[i]),
			"--routes", strings.Join(routes, ","))
		c.names = append(c.names, name)
		c.urls = append(c.urls, fmt.Sprintf("nats://127.0.0.1:%d", clientPorts[i]))
		c.nodes = append(c.nodes, startProc(t, "nats-server "+name, nil, args...))
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, p := range c.nodes {
				t.Logf("==== %s ====\n%s", p.name, tail(p.out.String(), 3000))
			}
		}
	})
	// The cluster is ready once its meta leader can place a stream on n peers.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	nc, js := c.connect(t)
	defer nc.Close()
	var err error
	for ctx.Err() == nil {
		pctx, pcancel := context.WithTimeout(ctx, 2*time.Second)
		_, err = js.CreateOrUpdateStream(pctx, jetstream.StreamConfig{Name: "PROBE", Subjects: []string{"probe"}, Replicas: n, Storage: jetstream.MemoryStorage})
		if err == nil {
			err = js.DeleteStream(pctx, "PROBE")
		}
		pcancel()
		if err == nil {
			return c
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("the %d-node cluster did not form: %v", n, err)
	return nil
}

// url is every node's client URL, comma-separated, so that a client fails over.
func (c *natsCluster) url() string { return strings.Join(c.urls, ",") }

func (c *natsCluster) connect(t *testing.T) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	nc, err := nats.Connect(c.url(), nats.MaxReconnects(-1), nats.ReconnectWait(200*time.Millisecond), nats.RetryOnFailedConnect(true))
	if err != nil {
		t.Fatal(err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return nc, js
}

// streamInfo returns stream's info, retrying every failed request (a stream not created
// yet, a request lost while the cluster elects a leader) for up to a minute.
func streamInfo(t *testing.T, js jetstream.JetStream, stream string) *jetstream.StreamInfo {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		s, err := js.Stream(ctx, stream)
		cancel()
		if err == nil {
			return s.CachedInfo()
		}
		if time.Now().After(deadline) {
			t.Fatalf("stream %s: %v", stream, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// streamLeader returns the index of the node leading stream and the stream's replicas.
func (c *natsCluster) streamLeader(t *testing.T, js jetstream.JetStream, stream string) (int, int) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		s, err := js.Stream(ctx, stream)
		cancel()
		if err == nil {
			info := s.CachedInfo()
			if info.Cluster != nil && info.Cluster.Leader != "" {
				for i, n := range c.names {
					if n == info.Cluster.Leader {
						return i, info.Config.Replicas
					}
				}
				t.Fatalf("stream %s is led by %q, not a node of the cluster %v", stream, info.Cluster.Leader, c.names)
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("stream %s has no leader", stream)
	return -1, 0
}

// TestJetStreamCluster runs the pipeline's coordinator, cache writer and teachers as
// processes against a three-node JetStream cluster of `linearpatch nats-server` processes,
// the run's streams, KV bucket and object store created with --replicas 3, and SIGKILLs one
// node mid-run — the one leading the data stream (the records) and, in the full suite, in a
// second trial the one leading the KV bucket (the run's state and done markers): the run
// completes with every shard in the cache once, bit-identical to a single-process run.
func TestJetStreamCluster(t *testing.T) {
	fx := newPipelineFixture(t)
	ref := fx.reference(t)
	victims := []string{"data", "kv"}
	if testing.Short() {
		victims = victims[:1]
	}
	for _, victim := range victims {
		t.Run("kill-"+victim+"-leader", func(t *testing.T) { clusterTrial(t, fx, ref, victim) })
	}
}

// clusterTrial runs one TestJetStreamCluster trial, killing the leader of the run's data
// stream (victim "data") or KV bucket ("kv").
func clusterTrial(t *testing.T, fx pipelineFixture, ref map[int]string, victim string) {
	cl := startNATSCluster(t, filepath.Join(fx.dir, "cluster-"+victim), 3)
	d := newDistributed(t, fx, "cluster-"+victim)
	url := cl.url()
	args := append(append([]string{"coordinator", "--nats", url, "--replicas", "3"}, fx.settingsArgs()...),
		"--out", d.out, "--run-dir", d.runDir, "--ack-wait", "2s", "--lease", "4s", "--distill=false")
	d.coord = startProc(t, "coordinator", nil, args...)
	waitFile(t, filepath.Join(d.runDir, "run.id"), 30*time.Second)
	d.cache = startProc(t, "cache", nil, "cache", "--run-dir", d.runDir, "--model", fx.model, "--nats", url)
	d.startTeacher(nil, url, "100ms")
	d.startTeacher(nil, url, "100ms")

	id, err := os.ReadFile(filepath.Join(d.runDir, "run.id"))
	if err != nil {
		t.Fatal(err)
	}
	names, err := worker.NewNames(strings.TrimSpace(string(id)))
	if err != nil {
		t.Fatal(err)
	}
	nc, js := cl.connect(t)
	defer nc.Close()
	// run.id is written before the coordinator connects: wait for its streams.
	for _, stream := range []string{names.TasksStream(), names.DataStream(), names.DeadStream(), "KV_" + names.KVBucket(), "OBJ_" + names.ObjectStore()} {
		if r := streamInfo(t, js, stream).Config.Replicas; r != 3 {
			t.Fatalf("stream %s has %d replicas, want 3", stream, r)
		}
	}

	stream := names.DataStream()
	if victim == "kv" {
		stream = "KV_" + names.KVBucket()
	}
	d.waitCacheShards(2)
	node, _ := cl.streamLeader(t, js, stream)
	cl.nodes[node].kill()
	_ = cl.nodes[node].wait(t, 10*time.Second)
	d.requireMidRun(ref, fmt.Sprintf("%s, the leader of %s, was killed", cl.names[node], stream))
	// A coordinator that does not finish dumps its goroutines (SIGQUIT) into the log: a
	// JetStream call that waits forever after the node's loss shows there.
	select {
	case err := <-d.coord.done:
		d.coord.done <- err
	case <-time.After(2 * time.Minute):
		_ = d.coord.cmd.Process.Signal(syscall.SIGQUIT)
		_ = d.coord.wait(t, 10*time.Second)
		t.Fatalf("the coordinator did not finish in 2 minutes after %s was killed; its goroutines:\n%s", cl.names[node], tail(d.coord.out.String(), 30000))
	}
	d.finish(ref)
	// A new leader took over on one of the two nodes left.
	if leader, _ := cl.streamLeader(t, js, stream); leader == node {
		t.Fatalf("the killed node %s still leads %s", cl.names[node], stream)
	}
}

// TestClusterFlagErrors: nats-server's cluster flags and --replicas are checked before
// anything starts.
func TestClusterFlagErrors(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		args []string
		want string
	}{
		{natsServerArgs(dir, "127.0.0.1:0", "--routes", "nats-route://127.0.0.1:1"), "need --cluster-name"},
		{natsServerArgs(dir, "127.0.0.1:0", "--cluster-name", "c", "--cluster-listen", "127.0.0.1:0"), "needs --server-name"},
		{natsServerArgs(dir, "127.0.0.1:0", "--cluster-name", "c", "--server-name", "a"), "needs --cluster-listen"},
		{natsServerArgs(dir, "127.0.0.1:0", "--cluster-name", "c", "--server-name", "a", "--cluster-listen", "127.0.0.1:0", "--routes", "http://x:1"), "want nats-route://HOST:PORT"},
		{natsServerArgs(dir, "127.0.0.1:0", "--cluster-name", "a b", "--server-name", "a", "--cluster-listen", "127.0.0.1:0"), "cluster name"},
		{natsServerArgs(dir, "127.0.0.1:0", "--cluster-name", "c", "--server-name", "a", "--cluster-listen", "0.0.0.0:0"), "beyond loopback"},
		{[]string{"coordinator", "--replicas", "3", "--model", "x", "--calib", "x", "--num-prune", "1", "--out", filepath.Join(dir, "o")}, "needs a JetStream cluster"},
		{[]string{"coordinator", "--replicas", "7", "--nats", "nats://127.0.0.1:1", "--model", "x", "--calib", "x", "--num-prune", "1", "--out", filepath.Join(dir, "o")}, "want 1..5"},
		{[]string{"coordinator", "--compression", "lz4"}, "unknown flag: --compression"},
	} {
		out, err := runCLI(t, c.args...)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: %v, want an error with %q\n%s", c.args, err, c.want, tail(out, 500))
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "o.run")); !os.IsNotExist(err) {
		t.Errorf("a refused coordinator left its run directory (%v)", err)
	}
}

// TestNoIgnoredNATSFlags: a command does not accept a flag it would ignore — the embedded
// server's settings belong to run and coordinator without --nats, the task redelivery
// settings to the commands that create or consume tasks.
func TestNoIgnoredNATSFlags(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"cache", "--nats-listen", "127.0.0.1:0"}, "unknown flag: --nats-listen"},
		{[]string{"teacher", "--nats-max-payload", "8388608"}, "unknown flag: --nats-max-payload"},
		{[]string{"status", "--ack-wait", "5s"}, "unknown flag: --ack-wait"},
		{[]string{"cache", "--max-deliver", "3"}, "unknown flag: --max-deliver"},
		{[]string{"purge", "--nats-listen", "127.0.0.1:0"}, "unknown flag: --nats-listen"},
		{[]string{"coordinator", "--nats", "nats://127.0.0.1:1", "--nats-listen", "0.0.0.0:4222"}, "which --nats replaces"},
		{[]string{"coordinator", "--nats", "nats://127.0.0.1:1", "--nats-max-payload", "8388608"}, "which --nats replaces"},
	} {
		out, err := runCLI(t, c.args...)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: %v, want an error with %q\n%s", c.args, err, c.want, tail(out, 500))
		}
	}
}
