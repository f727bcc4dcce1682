package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"

	"linearpatch/internal/fakenats"
)

// TestNetnsMissing: the network-namespace test names what it lacks, and only then.
func TestNetnsMissing(t *testing.T) {
	found := func(string) (string, error) { return "/usr/sbin/ip", nil }
	lost := func(string) (string, error) { return "", exec.ErrNotFound }
	for _, c := range []struct {
		euid  int
		look  func(string) (string, error)
		wants []string
	}{
		{0, found, nil},
		{1000, found, []string{"root"}},
		{0, lost, []string{"iproute2"}},
		{1000, lost, []string{"root", "iproute2"}},
	} {
		got := netnsMissing(c.euid, c.look)
		if (got == "") != (len(c.wants) == 0) {
			t.Errorf("euid %d: %q, want %v", c.euid, got, c.wants)
		}
		for _, w := range c.wants {
			if !strings.Contains(got, w) {
				t.Errorf("euid %d: %q does not name %s", c.euid, got, w)
			}
		}
	}
}

// flagSettings resolves args against the flags of the root's subcommand name, as the
// command would.
func flagSettings(t *testing.T, name string, args ...string) (settings, error) {
	t.Helper()
	cmd, _, err := newRootCmd().Find([]string{name})
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.ParseFlags(args); err != nil {
		t.Fatal(err)
	}
	return resolve(cmd)
}

// TestExplicitZeros: --lr 0, --epochs 0, --batch 0, --lease 0, --ack-wait 0 and
// --max-deliver 0 (by flag or environment) are errors, not the defaults; --seed 0 is the
// seed 0.
func TestExplicitZeros(t *testing.T) {
	for _, c := range []struct {
		cmd  string
		args []string
	}{
		{"run", []string{"--lr", "0"}}, {"run", []string{"--epochs", "0"}}, {"run", []string{"--batch", "0"}},
		{"student", []string{"--lr", "0"}}, {"coordinator", []string{"--lease", "0s"}}, {"teacher", []string{"--ack-wait", "0"}},
		{"teacher", []string{"--max-deliver", "0"}},
	} {
		_, err := flagSettings(t, c.cmd, c.args...)
		if err == nil || !strings.Contains(err.Error(), c.args[0]+" 0") {
			t.Errorf("%s %v: %v, want an error naming %s 0", c.cmd, c.args, err, c.args[0])
		}
	}
	t.Run("env", func(t *testing.T) {
		t.Setenv("LINEARPATCH_EPOCHS", "0")
		if _, err := flagSettings(t, "run"); err == nil {
			t.Error("LINEARPATCH_EPOCHS=0 was taken as the default")
		}
	})
	for _, c := range []struct {
		args []string
		seed uint64
	}{{nil, 1}, {[]string{"--seed", "0"}, 0}, {[]string{"--seed", "7"}, 7}} {
		s, err := flagSettings(t, "student", c.args...)
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := trainConfig(s, 8)
		if err != nil || cfg.Seed != c.seed {
			t.Errorf("%v: seed %d (%v), want %d", c.args, cfg.Seed, err, c.seed)
		}
	}
	// Values that are not zero pass.
	if _, err := flagSettings(t, "run", "--lr", "1e-3", "--lease", "5s", "--ack-wait", "2s", "--max-deliver", "3"); err != nil {
		t.Errorf("non-zero values refused: %v", err)
	}
}

// TestRunSettingsCheckedFirst: run refuses a bad distillation setting before any work —
// no run directory, no server, no cache.
func TestRunSettingsCheckedFirst(t *testing.T) {
	fx := newPipelineFixture(t)
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--loss", "full-kl"}, "--cache-final"},
		{[]string{"--loss", "mse"}, "--cache-final"},
		{[]string{"--loss", "l1", "--cache-final"}, "l1"},
		{[]string{"--lr", "0"}, "--lr 0"},
		{[]string{"--epochs", "0"}, "--epochs 0"},
		{[]string{"--batch", "0"}, "--batch 0"},
		{[]string{"--teachers", "-1"}, "--teachers"},
	} {
		out := filepath.Join(fx.dir, "bad", "out")
		began := time.Now()
		_, err := runCLI(t, append(append([]string{"run"}, fx.settingsArgs()...), append([]string{"--out", out}, c.args...)...)...)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: %v, want an error naming %s", c.args, err, c.want)
		}
		if _, serr := os.Stat(out + ".run"); !os.IsNotExist(serr) {
			t.Errorf("%v: the refused run left %s.run (%v)", c.args, out, serr)
		}
		if d := time.Since(began); d > 10*time.Second {
			t.Errorf("%v: refused after %v", c.args, d)
		}
	}
}

// startTestServer starts a real nats-server in-process on loopback: on o.Port, or a free
// port when it is 0; with JetStream in o.StoreDir, or a fresh directory when it is "".
func startTestServer(t *testing.T, o *server.Options) *server.Server {
	t.Helper()
	o.Host, o.NoLog, o.NoSigs = "127.0.0.1", true, true
	if o.Port == 0 {
		o.Port = -1
	}
	if o.JetStream && o.StoreDir == "" {
		o.StoreDir = t.TempDir()
	}
	s, err := server.NewServer(o)
	if err != nil {
		t.Fatal(err)
	}
	go s.Start()
	t.Cleanup(s.Shutdown)
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server did not start")
	}
	return s
}

// TestCoordinatorConnectFailureLeavesNothing: a coordinator refused by its server leaves no
// run directory (nor run.id, plan.json in a directory that was there before).
func TestCoordinatorConnectFailureLeavesNothing(t *testing.T) {
	fx := newPipelineFixture(t)
	s := startTestServer(t, &server.Options{JetStream: true, Username: "lp", Password: "right"})
	out := filepath.Join(fx.dir, "refused", "out")
	existing := filepath.Join(fx.dir, "existing-run-dir")
	if err := os.MkdirAll(existing, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, extra := range [][]string{nil, {"--run-dir", existing}} {
		args := append(append([]string{"coordinator", "--nats", s.ClientURL(), "--nats-user", "lp", "--nats-password", "wrong"},
			fx.settingsArgs()...), append([]string{"--out", out}, extra...)...)
		_, err := runCLI(t, args...)
		if err == nil || !strings.Contains(strings.ToLower(err.Error()), "authorization") {
			t.Fatalf("%v: %v, want an authorization error", extra, err)
		}
		if _, err := os.Stat(out + ".run"); !os.IsNotExist(err) {
			t.Errorf("the refused coordinator left %s.run (%v)", out, err)
		}
		if ents, err := os.ReadDir(existing); err != nil || len(ents) > 0 {
			t.Errorf("the refused coordinator left %v in %s (%v)", ents, existing, err)
		}
	}
}

// statusOut is the part of status --json the tests read.
type statusOut struct {
	Run        string  `json:"run"`
	Phase      string  `json:"phase"`
	AgeSeconds float64 `json:"age_seconds"`
	Warning    string  `json:"warning"`
	Server     string  `json:"server"`
	Phases     []struct {
		Phase         string `json:"phase"`
		Pending       int    `json:"pending"`
		Total         int    `json:"total"`
		PendingShards []int  `json:"pending_shards"`
	} `json:"phases"`
	Teachers    []json.RawMessage `json:"teachers"`
	CacheWriter *struct {
		RenewalSeconds float64 `json:"renewal_seconds"`
	} `json:"cache_writer"`
	RunDir *struct {
		Finished     bool `json:"finished"`
		CacheShards  int  `json:"cache_shards"`
		CachedShards int  `json:"cached_shards"`
	} `json:"run_dir"`
}

// TestStatusStallAndPurge runs a coordinator and cache writer on an external server with no
// teacher: status --json lists the pending shards, "teachers": [] and durations in seconds,
// and — once a lease passed — status and the coordinator's log say no teacher came; when the
// one teacher that came is killed, they say every teacher is gone. purge refuses the run
// while it goes; once a teacher finished it, purge lists the run's stores with their sizes
// and removes them.
func TestStatusStallAndPurge(t *testing.T) {
	fx := newPipelineFixture(t)
	d := newDistributed(t, fx, "purge")
	url := fmt.Sprintf("nats://127.0.0.1:%d", d.port)
	startProc(t, "nats-server", nil, natsServerArgs(filepath.Join(fx.dir, "purge", "nats"), fmt.Sprintf("127.0.0.1:%d", d.port))...)
	d.coord = startProc(t, "coordinator", nil, append(append([]string{"coordinator", "--nats", url}, fx.settingsArgs()...),
		"--out", d.out, "--run-dir", d.runDir, "--ack-wait", "2s", "--lease", "4s", "--distill=false")...)
	waitFile(t, filepath.Join(d.runDir, "run.id"), 30*time.Second)
	d.cache = startProc(t, "cache", nil, "cache", "--run-dir", d.runDir, "--model", fx.model, "--nats", url)

	var st statusOut
	var raw string
	deadline := time.Now().Add(45 * time.Second)
	for st.Warning == "" || st.CacheWriter == nil {
		if time.Now().After(deadline) {
			t.Fatalf("status never warned that no teacher came:\n%s", raw)
		}
		time.Sleep(500 * time.Millisecond)
		out, err := runCLI(t, "status", "--nats", url, "--run-dir", d.runDir, "--json")
		if err != nil {
			continue
		}
		raw = out
		st = statusOut{}
		lastJSON(t, out, &st)
	}
	if !strings.Contains(st.Warning, "no teacher has reported") || st.Phase != "stats" {
		t.Errorf("warning %q in phase %s", st.Warning, st.Phase)
	}
	if st.Teachers == nil || len(st.Teachers) != 0 || !strings.Contains(raw, `"teachers":[]`) {
		t.Errorf("teachers not an empty list:\n%s", raw)
	}
	if len(st.Phases) == 0 || st.Phases[0].Phase != "stats" || st.Phases[0].Pending != 4 || len(st.Phases[0].PendingShards) != 4 ||
		st.Phases[0].PendingShards[0] != 0 || st.Phases[0].PendingShards[3] != 3 {
		t.Errorf("pending stats shards not listed:\n%s", raw)
	}
	if r := st.CacheWriter.RenewalSeconds; !(r > 0 && r < 600) || !(st.AgeSeconds >= 0 && st.AgeSeconds < 60) {
		t.Errorf("durations not in seconds: renewal %v, age %v", r, st.AgeSeconds)
	}
	text, err := runCLI(t, "status", "--nats", url, "--run-dir", d.runDir)
	if err != nil || !strings.Contains(text, "WARNING: no teacher has reported") || !strings.Contains(text, "pending stats shards: 0 1 2 3") {
		t.Errorf("status text (%v):\n%s", err, text)
	}
	if !strings.Contains(d.coord.out.String(), "the run is stalled: no teacher has reported") {
		t.Errorf("the coordinator's log does not say no teacher came")
	}

	for _, force := range []string{"--force=false", "--force"} {
		if _, err := runCLI(t, "purge", "--nats", url, "--run-dir", d.runDir, force); err == nil || !strings.Contains(err.Error(), "still going") {
			t.Fatalf("purge %s of a running run: %v", force, err)
		}
	}

	// A teacher comes and dies: once its lease passed, status and the log say all teachers
	// are gone; another one finishes the run.
	victim := d.startTeacher(nil, url, "300ms")
	waitStatus := func(what string, cond func(statusOut) bool) {
		t.Helper()
		deadline := time.Now().Add(45 * time.Second)
		for {
			out, err := runCLI(t, "status", "--nats", url, "--run-dir", d.runDir, "--json")
			if err == nil {
				st = statusOut{}
				lastJSON(t, out, &st)
				if cond(st) {
					return
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("status never showed %s:\n%s", what, out)
			}
			time.Sleep(300 * time.Millisecond)
		}
	}
	waitStatus("the teacher at work", func(st statusOut) bool { return len(st.Teachers) == 1 && st.Warning == "" })
	victim.kill()
	waitStatus("that every teacher is gone", func(st statusOut) bool { return strings.Contains(st.Warning, "all 1 teachers are gone") })
	if !strings.Contains(d.coord.out.String(), "the run is stalled: all 1 teachers are gone") {
		t.Errorf("the coordinator's log does not say its teachers are gone")
	}
	d.startTeacher(nil, url, "0s")
	if err := d.coord.wait(t, 3*time.Minute); err != nil {
		t.Fatalf("coordinator: %v", err)
	}
	var listed struct {
		Bytes  uint64 `json:"bytes"`
		Stores []struct {
			Name    string `json:"name"`
			Present bool   `json:"present"`
			Bytes   uint64 `json:"bytes"`
			Removed bool   `json:"removed"`
		} `json:"stores"`
	}
	out, err := runCLI(t, "purge", "--nats", url, "--run-dir", d.runDir, "--dry-run", "--json")
	if err != nil {
		t.Fatal(err)
	}
	lastJSON(t, out, &listed)
	if len(listed.Stores) != 6 || listed.Bytes == 0 { // tasks, data, dead, objects, gradients, bucket
		t.Fatalf("purge --dry-run:\n%s", out)
	}
	var sum uint64
	for _, s := range listed.Stores {
		sum += s.Bytes
		if s.Removed || (!s.Present && !strings.HasSuffix(s.Name, "_DEAD")) {
			t.Errorf("dry run: %+v", s)
		}
	}
	if sum != listed.Bytes {
		t.Errorf("sizes add up to %d, total %d", sum, listed.Bytes)
	}
	if out, err = runCLI(t, "purge", "--nats", url, "--run-dir", d.runDir, "--json"); err != nil {
		t.Fatal(err)
	}
	out, err = runCLI(t, "purge", "--nats", url, "--run-dir", d.runDir, "--dry-run", "--json")
	if err != nil {
		t.Fatal(err)
	}
	listed.Bytes = 1
	lastJSON(t, out, &listed)
	for _, s := range listed.Stores {
		if s.Present {
			t.Errorf("%s is still there after purge", s.Name)
		}
	}
}

// TestStatusAfterFinishedRun: status --run-dir of a finished single-process run says the
// run finished and its server is gone, from the run directory, without waiting for the
// dead server.
func TestStatusAfterFinishedRun(t *testing.T) {
	fx := newPipelineFixture(t)
	fx.reference(t)
	runDir := filepath.Join(fx.dir, "ref", "run")
	began := time.Now()
	out, err := runCLI(t, "status", "--run-dir", runDir)
	if err != nil {
		t.Fatalf("status of a finished run: %v\n%s", err, out)
	}
	if d := time.Since(began); d > 10*time.Second {
		t.Errorf("status took %v", d)
	}
	if !strings.Contains(out, "finished") || !strings.Contains(out, "is gone") || !strings.Contains(out, "cache: 22 of 22 shards") {
		t.Errorf("status of a finished run:\n%s", out)
	}
	out, err = runCLI(t, "status", "--run-dir", runDir, "--json")
	if err != nil {
		t.Fatal(err)
	}
	var st statusOut
	lastJSON(t, out, &st)
	if st.Server != "gone" || st.Phase != "done" || st.RunDir == nil || !st.RunDir.Finished || st.RunDir.CachedShards != st.RunDir.CacheShards {
		t.Errorf("status --json of a finished run:\n%s", out)
	}
}

// TestEveryCommandRefusesOldServer: every command that connects stops at once on a
// nats-server older than 2.10.0, naming the version found and the one needed.
func TestEveryCommandRefusesOldServer(t *testing.T) {
	fx := newPipelineFixture(t)
	url := fakenats.Start(t, "2.9.10")
	runDir := filepath.Join(fx.dir, "old", "run")
	for _, args := range [][]string{
		append(append([]string{"coordinator", "--nats", url}, fx.settingsArgs()...), "--out", filepath.Join(fx.dir, "old", "out"), "--run-dir", runDir),
		append(append([]string{"run", "--nats", url}, fx.settingsArgs()...), "--out", filepath.Join(fx.dir, "old", "out2")),
		{"teacher", "--nats", url, "--run", "r0123456789ab", "--model", fx.model},
		{"cache", "--nats", url, "--run", "r0123456789ab", "--model", fx.model, "--dir", filepath.Join(fx.dir, "old", "cache")},
		{"status", "--nats", url, "--run", "r0123456789ab"},
		{"purge", "--nats", url, "--run", "r0123456789ab"},
		{"student", "--nats", url, "--run", "r0123456789ab", "--model", fx.model, "--dir", filepath.Join(fx.dir, "old", "student")},
	} {
		began := time.Now()
		_, err := runCLI(t, args...)
		if err == nil || !strings.Contains(err.Error(), "2.9.10") || !strings.Contains(err.Error(), "2.10.0") {
			t.Errorf("%s on nats-server 2.9.10: %v, want an error naming 2.9.10 and 2.10.0", args[0], err)
		}
		if d := time.Since(began); d > 10*time.Second {
			t.Errorf("%s gave up after %v", args[0], d)
		}
	}
	if _, err := os.Stat(runDir); !os.IsNotExist(err) {
		t.Errorf("the refused coordinator left %s (%v)", runDir, err)
	}
}

// TestCLIAuthFlags: --nats-token and --nats-nkey reach the connection: with the right
// credentials status gets past the login (to a run that does not exist), with wrong ones it
// stops at the authorization.
func TestCLIAuthFlags(t *testing.T) {
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := kp.PublicKey()
	seed, _ := kp.Seed()
	other, _ := nkeys.CreateUser()
	otherSeed, _ := other.Seed()
	dir := t.TempDir()
	seedFile, otherFile := filepath.Join(dir, "user.nk"), filepath.Join(dir, "other.nk")
	if os.WriteFile(seedFile, seed, 0o600) != nil || os.WriteFile(otherFile, otherSeed, 0o600) != nil {
		t.Fatal("writing the seeds")
	}
	token := startTestServer(t, &server.Options{JetStream: true, Authorization: "s3cret"})
	nkey := startTestServer(t, &server.Options{JetStream: true, Nkeys: []*server.NkeyUser{{Nkey: pub}}})
	for _, c := range []struct {
		name string
		url  string
		good []string
		bad  []string
	}{
		{"token", token.ClientURL(), []string{"--nats-token", "s3cret"}, []string{"--nats-token", "wrong"}},
		{"nkey", nkey.ClientURL(), []string{"--nats-nkey", seedFile}, []string{"--nats-nkey", otherFile}},
	} {
		args := []string{"status", "--nats", c.url, "--run", "r0123456789ab"}
		_, err := runCLI(t, append(args, c.good...)...)
		if err == nil || strings.Contains(strings.ToLower(err.Error()), "authorization") || !strings.Contains(err.Error(), "r0123456789ab") {
			t.Errorf("%s: right credentials: %v, want the login to pass and the run not to be found", c.name, err)
		}
		_, err = runCLI(t, append(args, c.bad...)...)
		if err == nil || !strings.Contains(strings.ToLower(err.Error()), "authorization") {
			t.Errorf("%s: wrong credentials: %v, want an authorization error", c.name, err)
		}
	}
}
