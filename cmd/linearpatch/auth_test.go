package main

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"linearpatch/worker"
)

// TestDefaultSetupAuthenticated attacks a coordinator started with its defaults (embedded
// server) the way the security review did, then runs it to the end with a teacher joining
// as from another machine (--nats, --run, --nats-nkey, as the README says) and the cache
// writer beside the run directory:
//   - an unauthenticated client cannot connect, so it can neither poison the cache nor
//     squat a record's message id;
//   - with the teacher's own key, publishing a task, a shard done record, the plan or an
//     object is refused;
//   - junk published (with the teacher's key) under the message ids of a real record and of
//     a done marker does not stall the run: the writer rejects it (WARN, with the publisher
//     it claims) and the coordinator recomputes those shards under fresh message ids;
//   - the run finishes with no permission violation and no ERROR line in any log, and no
//     role's secret appears in any log, in status (text and JSON) or in an error message.
func TestDefaultSetupAuthenticated(t *testing.T) {
	fx := newPipelineFixture(t)
	d := newDistributed(t, fx, "auth")
	d.startCoordinator()
	waitFile(t, filepath.Join(d.runDir, "run.id"), 30*time.Second)
	b, err := os.ReadFile(filepath.Join(d.runDir, "nats.url"))
	if err != nil {
		t.Fatal(err)
	}
	url := string(b)
	b, err = os.ReadFile(filepath.Join(d.runDir, "run.id"))
	if err != nil {
		t.Fatal(err)
	}
	runID := strings.TrimSpace(string(b))
	names, err := worker.NewNames(runID)
	if err != nil {
		t.Fatal(err)
	}
	credsDir := filepath.Join(d.runDir, "creds")
	seeds := map[worker.Role]string{}
	for _, r := range worker.FileRoles {
		f := worker.CredsFile(credsDir, r)
		st, err := os.Stat(f)
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Fatalf("role file %s: %v (%v)", f, err, st)
		}
		b, _ := os.ReadFile(f)
		seeds[r] = strings.TrimSpace(string(b))
	}
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(d.coord.out.String(), credsDir); {
		if time.Now().After(deadline) {
			t.Fatalf("the coordinator did not print the credentials directory %s", credsDir)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// Anonymous: refused at connect (no poisoning, no squatting without a key).
	if nc, err := nats.Connect(url, nats.Timeout(3*time.Second)); err == nil {
		nc.Close()
		t.Fatal("an unauthenticated client connected to the default set-up")
	} else if !errors.Is(err, nats.ErrAuthorization) {
		t.Fatalf("unauthenticated connect: %v, want an authorization error", err)
	}

	// With the teacher's key: no task, no done record, no plan, no object.
	opt, err := nats.NkeyOptionFromSeed(worker.CredsFile(credsDir, worker.RoleTeacher))
	if err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(url, opt, nats.ErrorHandler(func(*nats.Conn, *nats.Subscription, error) {}))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	var kv jetstream.KeyValue
	deadline := time.Now().Add(30 * time.Second)
	for kv == nil {
		if kv, err = js.KeyValue(t.Context(), names.KVBucket()); err != nil {
			if time.Now().After(deadline) {
				t.Fatalf("the run's bucket: %v", err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	short := func() (context.Context, context.CancelFunc) { return context.WithTimeout(t.Context(), 2*time.Second) }
	c, cancel := short()
	_, err = js.Publish(c, names.TaskSubject("cache"), []byte(`{"phase":"cache","shard":0}`))
	cancel()
	if err == nil {
		t.Error("the teacher role published a task")
	}
	for _, key := range []string{"done.cache.000000", "plan", "fit"} {
		c, cancel := short()
		_, err := kv.Put(c, key, []byte(`{}`))
		cancel()
		if err == nil {
			t.Errorf("the teacher role wrote KV %s", key)
		}
	}
	obj, err := js.ObjectStore(t.Context(), names.ObjectStore())
	if err != nil {
		t.Fatal(err)
	}
	c, cancel = short()
	_, err = obj.PutBytes(c, "patch0", []byte("junk"))
	cancel()
	if err == nil {
		t.Error("the teacher role wrote the patch")
	}
	// Squatting: junk under the message ids the real teacher will use for cache shard 0's
	// first record, cache shard 1's done marker and stats shard 0's first record (a teacher's
	// key allows publishing records). The
	// stream then drops the real ones as duplicates; the writer rejects the junk and the
	// shards are recomputed under fresh ids instead of stalling the run.
	for _, k := range []worker.DataKey{
		{Run: runID, Phase: "cache", Shard: 0, Window: 0, Chunk: 0},
		{Run: runID, Phase: "cache", Shard: 1, Done: true},
		{Run: runID, Phase: "stats", Shard: 0, Window: 0},
	} {
		m := nats.NewMsg(k.Subject())
		m.Data = []byte("twenty bytes of junk")
		m.Header.Set(jetstream.MsgIDHeader, worker.MsgID(k))
		m.Header.Set(worker.PublisherHeader, "evil")
		if _, err := js.PublishMsg(t.Context(), m); err != nil {
			t.Fatalf("squatting %s: %v", worker.MsgID(k), err)
		}
	}
	nc.Close()

	// Status as the status role, text and JSON, and a login with a key the run does not know.
	logs := map[string]string{}
	deadline = time.Now().Add(30 * time.Second)
	cli := func(args ...string) (string, error) {
		p := startProc(t, args[0], nil, args...)
		err := p.wait(t, time.Minute)
		return p.out.String(), err
	}
	for {
		out, err := cli("status", "--nats", url, "--run", runID, "--nats-nkey", worker.CredsFile(credsDir, worker.RoleStatus))
		if err == nil {
			logs["status"] = out
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status: %v\n%s", err, out)
		}
		time.Sleep(200 * time.Millisecond)
	}
	out, err := cli("status", "--json", "--run-dir", d.runDir)
	if err != nil {
		t.Fatalf("status --json with the run directory's status key: %v\n%s", err, out)
	}
	logs["status --json"] = out
	const unknown = "SUAIBDPBAUTWCWBKIO6XHQNINK5FWJW4OHLXC3HQ2KFE4PEJUA44CNHTC4"
	wrong := filepath.Join(t.TempDir(), "wrong.nk")
	if err := os.WriteFile(wrong, []byte(unknown+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err = cli("status", "--nats", url, "--run", runID, "--nats-nkey", wrong)
	if err == nil {
		t.Fatalf("status with an unknown key succeeded:\n%s", out)
	}
	if !strings.Contains(strings.ToLower(out), "authorization") {
		t.Errorf("status with an unknown key does not say it was refused:\n%s", out)
	}
	logs["refused status"] = out
	seeds["unknown"] = unknown
	const password = "pw-7f3a9c1e5b"
	out, err = cli("status", "--nats", url, "--run", runID, "--nats-user", "status", "--nats-password", password)
	if err == nil {
		t.Fatalf("status with a password the server does not know succeeded:\n%s", out)
	}
	logs["refused password"] = out
	seeds["password"] = password

	// The attacks above are logged by the server (ERROR "Publish Violation", "authentication
	// error"); from here on the run is healthy and must log none.
	attacked := len(d.coord.out.String())

	// The run, with a teacher as on another machine and the writer beside the run directory.
	d.startCache()
	teacher := startProc(t, "teacher", nil, "teacher", "--nats", url, "--run", runID,
		"--nats-nkey", worker.CredsFile(credsDir, worker.RoleTeacher), "--model", fx.model, "--threads", "1", "--name", "remote")
	d.teachers = append(d.teachers, teacher)
	if err := d.coord.wait(t, 3*time.Minute); err != nil {
		t.Fatalf("coordinator: %v", err)
	}
	// (Workers notice the end by polling the run's phase; one that missed it before the
	// embedded server went away keeps waiting for it: stop them.)
	d.cache.kill()
	teacher.kill()
	for _, want := range []string{`phase=cache shard=0`, `phase=cache shard=1`, `phase=stats shard=0`} {
		if !regexp.MustCompile(`level=WARN msg="a record of the shard was rejected; recomputing it under fresh message ids" .*` + want + ` .*claimed_publisher=evil`).MatchString(d.coord.out.String()) {
			t.Errorf("the coordinator did not recompute the squatted %s at WARN naming the claimed publisher", want)
		}
	}
	if !strings.Contains(d.cache.out.String(), `claimed_publisher=evil`) {
		t.Error("the cache writer did not log the rejected junk with its claimed publisher")
	}
	plan, err := os.ReadFile(filepath.Join(d.runDir, "plan.json"))
	if err != nil {
		t.Fatal(err)
	}
	var p struct{ Cache []struct{} }
	if err := json.Unmarshal(plan, &p); err != nil {
		t.Fatal(err)
	}
	if got := len(manifestSums(t, filepath.Join(d.runDir, "cache"))); got != len(p.Cache) {
		t.Errorf("%d shards in the cache, the plan has %d", got, len(p.Cache))
	}
	logs["coordinator"], logs["cache"], logs["teacher"] = d.coord.out.String()[attacked:], d.cache.out.String(), teacher.out.String()
	for _, name := range []string{"coordinator", "cache", "teacher"} {
		out := logs[name]
		for _, line := range strings.Split(out, "\n") {
			if strings.Contains(line, "level=ERROR") || strings.Contains(strings.ToLower(line), "permissions violation") {
				t.Errorf("%s logged: %s", name, line)
			}
		}
	}

	logs["coordinator, whole"] = d.coord.out.String()
	for name, out := range logs {
		for r, seed := range seeds {
			if strings.Contains(out, seed) || len(seed) > 20 && strings.Contains(out, seed[:20]) {
				t.Errorf("%s shows the %s key", name, r)
			}
		}
	}
}

// TestServerRefusesUnsafe: `nats-server` needs an authorization config or --allow-anonymous,
// and TLS or --insecure-plaintext beyond loopback; a coordinator's embedded server needs TLS
// or --nats-insecure-plaintext beyond loopback. Each refusal says what to give.
func TestServerRefusesUnsafe(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"nats-server", "--dir", dir}, "--allow-anonymous"},
		{[]string{"nats-server", "--dir", dir, "--allow-anonymous", "--listen", "0.0.0.0:0"}, "without TLS"},
		{[]string{"nats-server", "--nats-config", filepath.Join("..", "..", "deploy", "nats", "auth.conf"), "--dir", dir}, "without TLS"},
	}
	for _, c := range cases {
		out, err := runCLI(t, c.args...)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("linearpatch %s: %v, want an error naming %q\n%s", strings.Join(c.args, " "), err, c.want, out)
		}
	}
	if !strings.Contains(newNATSServerCmd().Flags().Lookup("allow-anonymous").Usage, "UNSAFE") {
		t.Error("--allow-anonymous does not say it is unsafe")
	}
	fx := newPipelineFixture(t)
	_, err := runCLI(t, append(append([]string{"coordinator", "--nats-listen", "0.0.0.0:0"}, fx.settingsArgs()...),
		"--out", filepath.Join(fx.dir, "out"))...)
	if err == nil || !strings.Contains(err.Error(), "without TLS") {
		t.Errorf("coordinator listening on 0.0.0.0 without TLS: %v", err)
	}
}
