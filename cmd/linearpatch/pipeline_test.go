package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"linearpatch/shards"
)

// binPath is the linearpatch binary the process tests run, built by TestMain.
var binPath string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "linearpatch-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binPath = filepath.Join(dir, "linearpatch")
	build := exec.Command("go", "build", "-o", binPath, ".")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building the binary for the process tests:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// syncBuffer is a goroutine-safe log sink.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// proc is a linearpatch process under test.
type proc struct {
	name string
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan error
}

func startProc(t *testing.T, name string, prefix []string, args ...string) *proc {
	t.Helper()
	argv := append(append(append([]string(nil), prefix...), binPath), args...)
	p := &proc{name: name, cmd: exec.Command(argv[0], argv[1:]...), out: &syncBuffer{}, done: make(chan error, 1)}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	p.cmd.Env = append(os.Environ(), "LINEARPATCH_LOG_LEVEL=debug")
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	t.Cleanup(func() {
		p.kill()
		<-p.done
	})
	return p
}

func (p *proc) kill() { _ = p.cmd.Process.Signal(syscall.SIGKILL) }

func (p *proc) wait(t *testing.T, d time.Duration) error {
	t.Helper()
	select {
	case err := <-p.done:
		p.done <- err
		return err
	case <-time.After(d):
		t.Fatalf("%s did not finish in %v", p.name, d)
		return nil
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func waitFile(t *testing.T, path string, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if _, err := os.Stat(path); err == nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s did not appear in %v", path, d)
}

// pipelineFixture is a small synthetic model with calibration and training token data.
type pipelineFixture struct {
	dir, model, calib, train string
}

func newPipelineFixture(t *testing.T) pipelineFixture {
	t.Helper()
	dir := t.TempDir()
	fx := pipelineFixture{dir: dir, model: filepath.Join(dir, "model"), calib: filepath.Join(dir, "calib.jsonl"), train: filepath.Join(dir, "train.jsonl")}
	if _, err := runCLI(t, "synth", "--out", fx.model, "--dim", "64", "--layers", "4", "--heads", "4", "--kv-heads", "2",
		"--ffn", "128", "--vocab", "256", "--seed", "7"); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(7, 7))
	writeIDs := func(path string, lines, n int) {
		var b strings.Builder
		for range lines {
			ids := make([]int, n)
			for i := range ids {
				ids[i] = rng.IntN(256)
			}
			j, _ := json.Marshal(map[string][]int{"input_ids": ids})
			b.Write(j)
			b.WriteByte('\n')
		}
		if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	writeIDs(fx.calib, 8, 32)
	writeIDs(fx.train, 42, 32)
	return fx
}

// settingsArgs are the run settings every process test shares (so every run has one id).
func (fx pipelineFixture) settingsArgs() []string {
	return []string{"--model", fx.model, "--calib", fx.calib, "--train", fx.train, "--num-prune", "1",
		"--seq-len", "32", "--calib-windows", "8", "--shard-windows", "2", "--top-k", "8", "--method", "rotate"}
}

// reference runs the pipeline in-process with one teacher and returns the shard checksums.
func (fx pipelineFixture) reference(t *testing.T) map[int]string {
	t.Helper()
	ref := filepath.Join(fx.dir, "ref")
	if _, err := runCLI(t, append(append([]string{"run"}, fx.settingsArgs()...), "--out", filepath.Join(ref, "out"), "--run-dir", filepath.Join(ref, "run"), "--teachers", "1")...); err != nil {
		t.Fatal(err)
	}
	return manifestSums(t, filepath.Join(ref, "run", "cache"))
}

func manifestSums(t *testing.T, cacheDir string) map[int]string {
	t.Helper()
	m, err := shards.LoadManifest(filepath.Join(cacheDir, "manifest.json"))
	if err != nil {
		t.Fatal(err)
	}
	out := map[int]string{}
	for _, e := range m.Shards {
		if _, dup := out[e.Shard]; dup {
			t.Fatalf("shard %d listed twice", e.Shard)
		}
		sum, err := shards.FileSHA256(e.Path(cacheDir))
		if err != nil || sum != e.SHA256 {
			t.Fatalf("shard %d: file checksum %s (%v), manifest %s", e.Shard, sum, err, e.SHA256)
		}
		// Every run has its own random id, written into its shard files' metadata: compare
		// the records, which must be bit-identical between runs of equal inputs.
		rows, err := shards.ReadShardFile(e.Path(cacheDir), m.Meta, e.SHA256)
		if err != nil {
			t.Fatalf("shard %d: %v", e.Shard, err)
		}
		b, err := json.Marshal(rows)
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.Sum256(b)
		out[e.Shard] = hex.EncodeToString(h[:])
	}
	return out
}

// distributed starts a coordinator (embedded NATS on port), the cache writer and teachers
// as separate processes.
type distributed struct {
	t        *testing.T
	fx       pipelineFixture
	runDir   string
	out      string
	port     int
	natsHost string
	coord    *proc
	earlier  []*proc // coordinators that were replaced (crashed on purpose)
	cache    *proc
	teachers []*proc
}

func newDistributed(t *testing.T, fx pipelineFixture, name string) *distributed {
	d := &distributed{t: t, fx: fx, runDir: filepath.Join(fx.dir, name, "run"), out: filepath.Join(fx.dir, name, "out"),
		port: freePort(t), natsHost: "127.0.0.1"}
	t.Cleanup(func() {
		if t.Failed() {
			d.dumpLogs()
		}
	})
	return d
}

func (d *distributed) startCoordinator(extra ...string) {
	args := append(append([]string{"coordinator", "--nats-listen", fmt.Sprintf("%s:%d", d.natsHost, d.port)}, d.fx.settingsArgs()...),
		"--out", d.out, "--run-dir", d.runDir, "--ack-wait", "2s", "--lease", "4s", "--json", "--distill=false")
	if d.coord != nil {
		d.earlier = append(d.earlier, d.coord)
	}
	d.coord = startProc(d.t, fmt.Sprintf("coordinator %d", len(d.earlier)), nil, append(args, extra...)...)
	waitFile(d.t, filepath.Join(d.runDir, "nats.url"), 30*time.Second)
}

func (d *distributed) startCache() {
	d.cache = startProc(d.t, "cache", nil, "cache", "--run-dir", d.runDir, "--model", d.fx.model)
}

func (d *distributed) startTeacher(prefix []string, natsURL string, delay string) *proc {
	args := []string{"teacher", "--run-dir", d.runDir, "--model", d.fx.model, "--threads", "1", "--slow-window", delay,
		"--name", fmt.Sprintf("t%d", len(d.teachers)), "--ack-wait", "2s"}
	if natsURL != "" {
		args = append(args, "--nats", natsURL)
	}
	p := startProc(d.t, fmt.Sprintf("teacher %d", len(d.teachers)), prefix, args...)
	d.teachers = append(d.teachers, p)
	return p
}

// waitCacheShards waits until the cache manifest lists at least n shards and returns their
// checksums by shard.
func (d *distributed) waitCacheShards(n int) map[int]string {
	d.t.Helper()
	manifest := filepath.Join(d.runDir, "cache", "manifest.json")
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		if m, err := shards.LoadManifest(manifest); err == nil && len(m.Shards) >= n {
			sums := map[int]string{}
			for _, e := range m.Shards {
				sums[e.Shard] = e.SHA256
			}
			return sums
		}
		time.Sleep(50 * time.Millisecond)
	}
	d.t.Fatal("the cache phase made no progress")
	return nil
}

// finish waits for the coordinator and checks the run completed with every shard once and
// bit-identical to the reference.
func (d *distributed) finish(ref map[int]string) {
	t := d.t
	if err := d.coord.wait(t, 3*time.Minute); err != nil {
		t.Fatalf("coordinator failed: %v\n%s", err, tail(d.coord.out.String(), 6000))
	}
	// Every process logs in with its role (the run directory's keys): none may hit a
	// permission it lacks, whatever the test did to the run.
	for _, p := range append(append(append([]*proc(nil), d.earlier...), d.coord, d.cache), d.teachers...) {
		if p == nil {
			continue
		}
		for _, line := range strings.Split(p.out.String(), "\n") {
			if strings.Contains(line, "Violation") {
				t.Errorf("%s: %s", p.name, line)
			}
		}
	}
	got := manifestSums(t, filepath.Join(d.runDir, "cache"))
	if len(got) != len(ref) {
		t.Fatalf("%d shards in the cache, reference has %d", len(got), len(ref))
	}
	for shard, sum := range ref {
		if got[shard] != sum {
			t.Fatalf("shard %d differs from the single-teacher run", shard)
		}
	}
}

// TestTeacherCrashes kills a teacher process at a random moment of a run (seeded trials):
// the run completes, every shard is in the cache once, and the cache is bit-identical to a
// single-teacher run.
func TestTeacherCrashes(t *testing.T) {
	fx := newPipelineFixture(t)
	ref := fx.reference(t)
	trials := 20
	if testing.Short() {
		trials = 3
	}
	for seed := range trials {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(seed), 99))
			d := newDistributed(t, fx, fmt.Sprint("trial", seed))
			d.startCoordinator()
			d.startCache()
			d.startTeacher(nil, "", "60ms")
			victim := d.startTeacher(nil, "", "60ms")
			time.Sleep(time.Duration(100+rng.IntN(1200)) * time.Millisecond)
			victim.kill()
			select {
			case err := <-d.coord.done:
				d.coord.done <- err
				t.Fatal("the run finished before the teacher was killed: the trial tests nothing")
			default:
			}
			d.startTeacher(nil, "", "5ms")
			d.finish(ref)
		})
	}
}

// TestTeacherInNetworkNamespace runs a teacher in its own network namespace, reaching the
// coordinator's NATS over a veth pair, so nothing assumes it shares the coordinator's host.
//
// It needs root and iproute2's ip. Without them it skips, saying which is missing, except
// in CI (CI=true), where both are present and a skip would hide the test: there it fails.
func TestTeacherInNetworkNamespace(t *testing.T) {
	if missing := netnsMissing(os.Geteuid(), exec.LookPath); missing != "" {
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true but the network-namespace test cannot run: %s", missing)
		}
		t.Skipf("needs %s", missing)
	}
	fx := newPipelineFixture(t)
	ref := fx.reference(t)
	ns := fmt.Sprintf("lpt%d", os.Getpid()%100000)
	hostIf, nsIf := "lph"+ns[3:], "lpn"+ns[3:]
	sub := 16 + os.Getpid()%200
	hostIP, nsIP := fmt.Sprintf("10.231.%d.1", sub), fmt.Sprintf("10.231.%d.2", sub)
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s (the test needs root and iproute2)", strings.Join(args, " "), err, out)
		}
	}
	ip("netns", "add", ns)
	t.Cleanup(func() {
		_ = exec.Command("ip", "link", "del", hostIf).Run()
		_ = exec.Command("ip", "netns", "del", ns).Run()
	})
	ip("link", "add", hostIf, "type", "veth", "peer", "name", nsIf)
	ip("link", "set", nsIf, "netns", ns)
	ip("addr", "add", hostIP+"/30", "dev", hostIf)
	ip("link", "set", hostIf, "up")
	ip("netns", "exec", ns, "ip", "addr", "add", nsIP+"/30", "dev", nsIf)
	ip("netns", "exec", ns, "ip", "link", "set", nsIf, "up")
	ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")

	d := newDistributed(t, fx, "netns")
	d.natsHost = hostIP
	// Beyond loopback without TLS: allowed only by the flag that says it is insecure.
	d.startCoordinator("--nats-insecure-plaintext")
	d.startCache()
	// The only teacher lives in the namespace: the run can only finish through it.
	d.startTeacher([]string{"ip", "netns", "exec", ns}, fmt.Sprintf("nats://%s:%d", hostIP, d.port), "0s")
	d.finish(ref)
}

// netnsMissing says what TestTeacherInNetworkNamespace lacks ("" when nothing): root
// (euid 0) and the ip command of iproute2, looked up with lookPath.
func netnsMissing(euid int, lookPath func(string) (string, error)) string {
	var missing []string
	if euid != 0 {
		missing = append(missing, fmt.Sprintf("root (running as uid %d)", euid))
	}
	if _, err := lookPath("ip"); err != nil {
		missing = append(missing, "iproute2 (no ip command: "+err.Error()+")")
	}
	return strings.Join(missing, " and ")
}

// startSlowRun starts a coordinator, the cache writer and two teachers slowed to 30 ms a
// window, so that a crash test can strike mid-phase; it returns the run and the reference
// checksums of its cache.
func startSlowRun(t *testing.T, name string) (*distributed, map[int]string) {
	t.Helper()
	fx := newPipelineFixture(t)
	ref := fx.reference(t)
	d := newDistributed(t, fx, name)
	d.startCoordinator()
	d.startCache()
	d.startTeacher(nil, "", "30ms")
	d.startTeacher(nil, "", "30ms")
	return d, ref
}

// TestCoordinatorCrash kills the coordinator (and its embedded NATS) mid-phase and restarts
// it: it resumes from the KV bucket and no shard completed before the crash is computed again.
func TestCoordinatorCrash(t *testing.T) {
	d, ref := startSlowRun(t, "coordcrash")
	before := d.waitCacheShards(4)
	d.coord.kill()
	_ = d.coord.wait(t, 10*time.Second)
	d.startCoordinator()
	d.finish(ref)
	// Whole logs are counted, not what follows the crash: a teacher may log a shard's
	// publication a moment after the cache writer stored it.
	computed := map[int]int{}
	for _, p := range d.teachers {
		for _, line := range strings.Split(p.out.String(), "\n") {
			if !strings.Contains(line, `msg="shard published"`) || !strings.Contains(line, "phase=cache") {
				continue
			}
			for shard := range before {
				if strings.Contains(line, fmt.Sprintf(" shard=%d ", shard)) {
					computed[shard]++
				}
			}
		}
	}
	for shard := range before {
		if computed[shard] > 1 {
			t.Errorf("cache shard %d was complete before the coordinator crashed, yet computed %d times", shard, computed[shard])
		}
	}
}

// TestCacheWriterCrash kills the cache writer mid-phase and restarts it: the restarted writer
// takes its lease over at once, gets the messages its predecessor held unacked without
// waiting for their 5-minute AckWait, and the cache ends bit-identical to the reference.
func TestCacheWriterCrash(t *testing.T) {
	d, ref := startSlowRun(t, "cachecrash")
	d.waitCacheShards(3)
	first := d.cache
	first.kill()
	_ = first.wait(t, 10*time.Second)
	d.requireMidRun(ref, "the cache writer was killed")
	d.earlier = append(d.earlier, first)
	d.startCache()
	d.finish(ref)
	if strings.Contains(d.cache.out.String(), "waiting to see whether it is alive") {
		t.Error("the restarted writer waited for its own lease")
	}
}

// TestSecondCacheWriterRefused: a run has one cache writer. A second one, started while the
// first holds the run (here before any teacher came, so the run waits in its stats phase),
// exits with an error naming the first and writes nothing; status shows the writer.
func TestSecondCacheWriterRefused(t *testing.T) {
	fx := newPipelineFixture(t)
	d := newDistributed(t, fx, "twowriters")
	d.startCoordinator()
	d.startCache()
	var out string
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		out, _ = runCLI(t, "status", "--run-dir", d.runDir)
		if strings.Contains(out, "cache writer: ") && !strings.Contains(out, "cache writer: none") {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !strings.Contains(out, "phase stats") || !strings.Contains(out, "writing "+filepath.Join(d.runDir, "cache")) {
		t.Fatalf("status does not show the run waiting in stats with its cache writer:\n%s", out)
	}
	out, err := runCLI(t, "status", "--run-dir", d.runDir, "--json")
	var st struct {
		Phase       string `json:"phase"`
		CacheWriter struct {
			Dir string `json:"dir"`
		} `json:"cache_writer"`
	}
	if err != nil || json.Unmarshal([]byte(out), &st) != nil || st.Phase != "stats" || st.CacheWriter.Dir != filepath.Join(d.runDir, "cache") {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	dir := filepath.Join(fx.dir, "twowriters", "second-cache")
	second := startProc(t, "second cache", nil, "cache", "--run-dir", d.runDir, "--model", fx.model, "--dir", dir)
	err = second.wait(t, time.Minute)
	if err == nil || !strings.Contains(second.out.String(), "another cache writer is writing this run") {
		t.Fatalf("the second cache writer did not stop with a clear error (%v):\n%s", err, tail(second.out.String(), 2000))
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("the refused writer created %s (%v)", dir, err)
	}
}

// TestNATSServerRestart restarts an external nats-server process mid-run.
func TestNATSServerRestart(t *testing.T) {
	fx := newPipelineFixture(t)
	ref := fx.reference(t)
	d := newDistributed(t, fx, "natsrestart")
	store := filepath.Join(fx.dir, "natsrestart", "nats")
	url := fmt.Sprintf("nats://127.0.0.1:%d", d.port)
	server := startProc(t, "nats-server", nil, natsServerArgs(store, fmt.Sprintf("127.0.0.1:%d", d.port))...)
	time.Sleep(500 * time.Millisecond)
	args := append(append([]string{"coordinator", "--nats", url}, fx.settingsArgs()...),
		"--out", d.out, "--run-dir", d.runDir, "--ack-wait", "2s", "--lease", "4s", "--distill=false")
	d.coord = startProc(t, "coordinator", nil, args...)
	waitFile(t, filepath.Join(d.runDir, "run.id"), 30*time.Second)
	d.cache = startProc(t, "cache", nil, "cache", "--run-dir", d.runDir, "--model", fx.model, "--nats", url)
	d.startTeacher(nil, url, "60ms")
	d.startTeacher(nil, url, "60ms")
	d.waitCacheShards(2)
	server.kill()
	_ = server.wait(t, 10*time.Second)
	d.requireMidRun(ref, "the NATS server was killed")
	time.Sleep(700 * time.Millisecond)
	startProc(t, "nats-server again", nil, natsServerArgs(store, fmt.Sprintf("127.0.0.1:%d", d.port))...)
	d.finish(ref)
}

// requireMidRun fails the test unless the run was still going when event happened (called
// right after it): the coordinator has not exited and the cache lacks shards of the
// reference. Without it a crash test could pass with the crash after the run's work.
func (d *distributed) requireMidRun(ref map[int]string, event string) {
	d.t.Helper()
	select {
	case err := <-d.coord.done:
		d.coord.done <- err
		d.t.Fatalf("the coordinator had exited (%v) when %s: the test restarted nothing mid-run", err, event)
	default:
	}
	m, err := shards.LoadManifest(filepath.Join(d.runDir, "cache", "manifest.json"))
	if err == nil && len(m.Shards) >= len(ref) {
		d.t.Fatalf("the cache held all %d shards when %s: the test restarted nothing mid-run", len(m.Shards), event)
	}
}

// dumpLogs writes every process log of a failed distributed test to the test log.
func (d *distributed) dumpLogs() {
	all := append(append(append([]*proc(nil), d.earlier...), d.coord, d.cache), d.teachers...)
	dir := os.Getenv("LINEARPATCH_TEST_LOGS")
	for _, p := range all {
		if p == nil {
			continue
		}
		d.t.Logf("==== %s ====\n%s", p.name, tail(p.out.String(), 3000))
		if dir != "" {
			name := strings.ReplaceAll(d.t.Name()+"-"+p.name, "/", "_")
			_ = os.WriteFile(filepath.Join(dir, strings.ReplaceAll(name, " ", "_")+".log"), []byte(p.out.String()), 0o644)
		}
	}
}
