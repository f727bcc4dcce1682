package main

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"linearpatch/worker"
)

// The acceptance test of data-parallel distillation (issue 11): real processes, each in its
// own working directory, joined only by the coordinator's embedded NATS server, which admits
// only the run's role keys (RUN-DIR/creds/ROLE.nk).

// dpFixture is tinystories-8L with two layers pruned and a short training text: 64-token
// windows, 301 of them (285 for training, 16 held out), 4 windows a step.
type dpFixture struct {
	dir, model, train, valid string
}

func newDPFixture(t *testing.T) dpFixture {
	t.Helper()
	dir := t.TempDir()
	abs := func(rel string) string {
		p, err := filepath.Abs(shared(t, rel))
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	fx := dpFixture{dir: dir, model: abs("models/tinystories-8L"), train: filepath.Join(dir, "train.txt"),
		valid: abs("data/tinystories/valid.txt")}
	b, err := os.ReadFile(abs("data/tinystories/train.txt"))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.SplitAfter(string(b), "\n")
	if err := os.WriteFile(fx.train, []byte(strings.Join(lines[:80], "")), 0o644); err != nil {
		t.Fatal(err)
	}
	return fx
}

// settingsArgs are the run's settings, the same for run and coordinator.
func (fx dpFixture) settingsArgs() []string {
	return []string{"--model", fx.model, "--calib", fx.train, "--calib-windows", "8", "--train", fx.train, "--num-prune", "2",
		"--seq-len", "64", "--shard-windows", "32", "--batch", "4", "--lr", "1e-3", "--checkpoint-every", "5",
		"--eval", fx.valid, "--eval-windows", "16", "--threads", "1"}
}

// dpResult is what run and coordinator print with --json, as far as this test reads it.
type dpResult struct {
	PPL map[string]float64 `json:"ppl"`
	KD  struct {
		Steps int `json:"steps"`
	} `json:"kd"`
}

// resultLine decodes the last line of out that is a JSON object with a "ppl" key (the
// processes log after printing their result).
func resultLine(t *testing.T, name, out string) dpResult {
	t.Helper()
	lines := strings.Split(out, "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		l := strings.TrimSpace(lines[i])
		if !strings.HasPrefix(l, "{") || !strings.Contains(l, `"ppl"`) {
			continue
		}
		var r dpResult
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatalf("%s: result line: %v\n%s", name, err, l)
		}
		return r
	}
	t.Fatalf("%s printed no JSON result:\n%s", name, tail(out, 3000))
	return dpResult{}
}

// dpRun is one run of the distributed set-up: the coordinator (with its embedded NATS
// server), and whatever workers the test starts, every process in its own directory under base.
type dpRun struct {
	t      *testing.T
	fx     dpFixture
	base   string
	runDir string
	url    string
	run    string
	coord  *proc
	procs  []*proc // every process started, for the logs of a failed test
	ok     bool    // its checks passed: a failure elsewhere in the test does not dump its logs
	// stopped are the students still running when the coordinator had exited (see finish).
	stopped []string
}

func newDPRun(t *testing.T, fx dpFixture, name string) *dpRun {
	r := &dpRun{t: t, fx: fx, base: filepath.Join(fx.dir, name)}
	r.runDir = filepath.Join(r.base, "coordinator", "run")
	t.Cleanup(func() {
		if !t.Failed() || r.ok {
			return
		}
		dir := os.Getenv("LINEARPATCH_TEST_LOGS")
		for _, p := range r.procs {
			t.Logf("==== %s (the embedded server's debug lines left out) ====\n%s", p.name, tail(withoutServerDebug(p.out.String()), 3000))
			if dir != "" {
				n := strings.NewReplacer("/", "_", " ", "_").Replace(t.Name() + "-" + p.name)
				_ = os.WriteFile(filepath.Join(dir, n+".log"), []byte(p.out.String()), 0o644)
			}
		}
	})
	return r
}

// withoutServerDebug drops the embedded NATS server's debug lines from a log.
func withoutServerDebug(log string) string {
	var b strings.Builder
	for _, l := range strings.SplitAfter(log, "\n") {
		if !strings.Contains(l, "level=DEBUG") || !strings.Contains(l, "component=nats-server") {
			b.WriteString(l)
		}
	}
	return b.String()
}

// start starts a linearpatch process in its own working directory base/dir.
func (r *dpRun) start(name, dir string, args ...string) *proc {
	r.t.Helper()
	wd := filepath.Join(r.base, dir)
	if err := os.MkdirAll(wd, 0o755); err != nil {
		r.t.Fatal(err)
	}
	// env -C execs the binary in wd: the process is the binary's (SIGKILL reaches it).
	p := startProc(r.t, name, []string{"env", "-C", wd}, args...)
	r.procs = append(r.procs, p)
	return p
}

// startCoordinator starts (or, on a run directory that exists, resumes) the coordinator and
// waits for its server's URL, the run id and the role keys.
func (r *dpRun) startCoordinator() {
	t := r.t
	t.Helper()
	_ = os.Remove(filepath.Join(r.runDir, "nats.url"))
	args := append(append([]string{"coordinator", "--nats-listen", fmt.Sprintf("127.0.0.1:%d", freePort(t))}, r.fx.settingsArgs()...),
		"--out", filepath.Join(r.base, "coordinator", "out"), "--run-dir", r.runDir, "--ack-wait", "2s", "--lease", "4s", "--json")
	r.coord = r.start("coordinator", "coordinator", args...)
	waitFile(t, filepath.Join(r.runDir, "nats.url"), time.Minute)
	for _, f := range []string{"nats.url", "run.id"} {
		b, err := os.ReadFile(filepath.Join(r.runDir, f))
		if err != nil {
			t.Fatal(err)
		}
		if f == "nats.url" {
			r.url = strings.TrimSpace(string(b))
		} else {
			r.run = strings.TrimSpace(string(b))
		}
	}
	for _, role := range worker.FileRoles {
		waitFile(t, worker.CredsFile(r.credsDir(), role), 10*time.Second)
	}
}

func (r *dpRun) credsDir() string { return filepath.Join(r.runDir, "creds") }

// join are the flags with which a worker of role joins the run: the URL, the run id and
// the role's key (as a copy of the role file would be given on another machine).
func (r *dpRun) join(role worker.Role) []string {
	return []string{"--nats", r.url, "--run", r.run, "--nats-nkey", worker.CredsFile(r.credsDir(), role)}
}

// startCacheAndTeachers starts the cache writer and two teachers.
func (r *dpRun) startCacheAndTeachers() {
	r.start("cache", "cache", append(append([]string{"cache"}, r.join(worker.RoleCache)...),
		"--model", r.fx.model, "--dir", filepath.Join(r.base, "cache", "shards"))...)
	for i := range 2 {
		r.start(fmt.Sprint("teacher ", i), fmt.Sprint("teacher-", i), append(append([]string{"teacher"}, r.join(worker.RoleTeacher)...),
			"--model", r.fx.model, "--threads", "1", "--name", fmt.Sprint("t", i), "--ack-wait", "2s")...)
	}
}

// startStudent starts a student in base/name (its --dir below it). Its lease is short, so
// that a killed student's windows are redone by the others within the test's time.
func (r *dpRun) startStudent(name string) *proc {
	return r.start(name, name, append(append([]string{"student"}, r.join(worker.RoleStudent)...),
		"--model", r.fx.model, "--threads", "1", "--dir", filepath.Join(r.base, name, "work"), "--student-lease", "2s")...)
}

// requireRunning fails the test unless the coordinator is still waiting for the students'
// patch when event happened: a trial whose event came after the distillation tests nothing.
func (r *dpRun) requireRunning(event string) {
	r.t.Helper()
	select {
	case err := <-r.coord.done:
		r.coord.done <- err
		r.t.Fatalf("the coordinator had exited (%v) when %s: the trial tests nothing", err, event)
	default:
	}
	if strings.Contains(r.coord.out.String(), "distilled patch arrived") {
		r.t.Fatalf("the distilled patch had arrived when %s: the trial tests nothing", event)
	}
}

// finish waits for the coordinator and the live students to exit cleanly and checks the
// exported patch and KD perplexity against the reference, bit for bit, and that no process
// of the run hit a permission it lacks or logged an error.
func (r *dpRun) finish(live []*proc, want []float32, wantPPL float64) {
	t := r.t
	t.Helper()
	if err := r.coord.wait(t, 2*time.Minute); err != nil {
		t.Fatalf("coordinator: %v\n%s", err, tail(r.coord.out.String(), 4000))
	}
	// The coordinator exported the run and stopped its embedded server. A student that had
	// fallen a few steps behind the others cannot reach it any more and keeps retrying (as a
	// teacher that misses the end does, see TestDefaultSetupAuthenticated): after a grace it
	// is stopped and said, not failed; the run's result is checked below. Every student that
	// did end must have ended cleanly.
	grace := time.After(5 * time.Second)
	for _, p := range live {
		select {
		case err := <-p.done:
			p.done <- err
			if err != nil {
				t.Fatalf("%s: %v\n%s", p.name, err, tail(withoutServerDebug(p.out.String()), 4000))
			}
		case <-grace:
			grace = time.After(0)
			p.kill()
			r.stopped = append(r.stopped, p.name)
			t.Logf("%s was still running 5 s after the coordinator exited, at step %d (behind the others when the server went away): stopped it",
				p.name, studentStep(p))
		}
	}
	for _, p := range r.procs {
		// (A stopped student logged the errors of its connection to the server that went away.)
		stopped := slices.Contains(r.stopped, p.name)
		for _, line := range strings.Split(p.out.String(), "\n") {
			if strings.Contains(line, "Violation") || !stopped && strings.Contains(line, "level=ERROR") {
				t.Errorf("%s: %s", p.name, line)
			}
		}
	}
	res := resultLine(t, "coordinator", r.coord.out.String())
	if got := res.PPL["kd"]; got != wantPPL {
		t.Errorf("KD perplexity %v, run's %v", got, wantPPL)
	}
	got := readPatch(t, filepath.Join(r.base, "coordinator", "out"))
	if len(got) != len(want) {
		t.Fatalf("patch of %d values, reference %d", len(got), len(want))
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("element %d of the students' patch is %v, run's %v (first difference)", i, got[i], want[i])
		}
	}
}

// dpStepLine is a student's log line that names an optimizer step it has completed.
var dpStepLine = regexp.MustCompile(`msg="student: checkpoint saved".* step=(\d+)`)

// studentStep is the last step p has logged a checkpoint of or computed a window of (-1: none).
func studentStep(p *proc) int {
	step := -1
	for _, m := range dpStepLine.FindAllStringSubmatch(p.out.String(), -1) {
		if n, err := strconv.Atoi(m[1]); err == nil && n > step {
			step = n
		}
	}
	for _, k := range windowsComputed(p) {
		step = max(step, k[0])
	}
	return step
}

// waitStep waits until one of ps has logged step at least: the run has reached it. It
// fails if they all exit first, or after d.
func waitStep(t *testing.T, ps []*proc, step int, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	last := func() (int, string) {
		best, names := -1, ""
		for _, p := range ps {
			best = max(best, studentStep(p))
			names += fmt.Sprintf(" %s at %d", p.name, studentStep(p))
		}
		return best, names
	}
	for {
		reached, at := last()
		if reached >= step {
			return
		}
		exited := 0
		for _, p := range ps {
			select {
			case err := <-p.done:
				p.done <- err
				exited++
			default:
			}
		}
		if exited == len(ps) {
			t.Fatalf("the students exited before step %d:%s", step, at)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no student reached step %d in %v:%s", step, d, at)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// dpWindowLine is a student's log line for a window gradient it computed and published
// (steps 1-based, windows by position in the step).
var dpWindowLine = regexp.MustCompile(`msg="student: window computed".* step=(\d+) window=(\d+)`)

// windowsComputed are the (step, window) pairs p has logged computing.
func windowsComputed(p *proc) [][2]int {
	var out [][2]int
	for _, m := range dpWindowLine.FindAllStringSubmatch(p.out.String(), -1) {
		s, _ := strconv.Atoi(m[1])
		w, _ := strconv.Atoi(m[2])
		out = append(out, [2]int{s, w})
	}
	return out
}

// checkSplit checks that the students split the windows: each of working computed at
// least one, and together they computed all `windows` of the run (a student killed between
// publishing a window and logging it leaves one that nobody logged: lost says how many are
// tolerated). It returns the windows computed more than once, and fails if they are more
// than a tenth: a window is computed again only when its student stopped renewing its claim
// for a lease (killed, or stalled on a loaded machine), so students that each compute most
// windows do not share the steps.
func checkSplit(t *testing.T, students, working []*proc, windows, lost int) []string {
	t.Helper()
	by := map[[2]int][]string{}
	for _, p := range students {
		w := windowsComputed(p)
		for _, k := range w {
			by[k] = append(by[k], p.name)
		}
	}
	for _, p := range working {
		if len(windowsComputed(p)) == 0 {
			t.Errorf("%s computed no window: the students did not split the steps", p.name)
		}
	}
	if len(by) > windows || len(by) < windows-lost {
		t.Errorf("the students computed %d distinct windows, the run has %d", len(by), windows)
	}
	var twice []string
	for k, names := range by {
		if len(names) > 1 {
			twice = append(twice, fmt.Sprintf("step %d window %d by %v", k[0], k[1], names))
		}
	}
	slices.Sort(twice)
	if len(twice) > windows/10 {
		t.Errorf("%d of %d windows computed more than once: %v", len(twice), windows, twice)
	}
	return twice
}

// dpReference distills with `run` and one student: the patch, the KD perplexity and the steps.
func dpReference(t *testing.T, fx dpFixture) ([]float32, float64, int) {
	t.Helper()
	ref := filepath.Join(fx.dir, "ref")
	out, err := runCLI(t, append(append([]string{"run"}, fx.settingsArgs()...), "--out", filepath.Join(ref, "out"),
		"--run-dir", filepath.Join(ref, "run"), "--teachers", "2", "--students", "1", "--json")...)
	if err != nil {
		t.Fatalf("run: %v\n%s", err, tail(out, 3000))
	}
	res := resultLine(t, "run", out)
	if res.PPL["kd"] == 0 || res.KD.Steps < 50 {
		t.Fatalf("run's result has no KD perplexity or too few steps: %+v", res)
	}
	return readPatch(t, filepath.Join(ref, "out")), res.PPL["kd"], res.KD.Steps
}

// copyTree copies the directory src to dst (which must not exist).
func copyTree(t *testing.T, src, dst string) {
	t.Helper()
	err := filepath.WalkDir(src, func(path string, e os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, path)
		target := filepath.Join(dst, rel)
		info, err := e.Info()
		if err != nil {
			return err
		}
		if e.IsDir() {
			err = os.MkdirAll(target, 0o700)
		} else {
			err = copyFile(path, target)
		}
		if err != nil {
			return err
		}
		return os.Chmod(target, info.Mode().Perm()) // the role keys stay 0600 in a 0700 directory
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestDataParallelStudents is issue 11's acceptance test. The embedded NATS server of the
// coordinator, the cache writer, two teachers and two students, each a separate process in
// its own working directory and logged in with its role's key, distill a patch bit-identical
// to `run`'s with one student and the same --batch, with the same KD perplexity.
//
// Then seeded trials (10, 2 with -short) run against copies of a run whose cache is
// complete (the coordinator resumes it; no teacher is needed): two students train, a
// seeded one is killed with SIGKILL when the run reaches a seeded step (at a seeded moment
// within it), and by the trial's kind it is restarted in another directory, or not (the
// other finishes alone once the lease has passed), or a third student joins mid-run before
// the kill. Every trial's patch is the reference's, bit for bit.
//
// A student that has fallen behind when the coordinator exits (its embedded server with
// it) cannot see the run's end; finish stops it after a grace and says so.
func TestDataParallelStudents(t *testing.T) {
	began := time.Now()
	fx := newDPFixture(t)
	want, wantPPL, steps := dpReference(t, fx)
	t.Logf("reference: %d steps, KD perplexity %v (%v)", steps, wantPPL, time.Since(began).Round(time.Millisecond))

	// The acceptance run: everything at once, the students training as shards land.
	t0 := time.Now()
	r := newDPRun(t, fx, "accept")
	r.startCoordinator()
	r.startCacheAndTeachers()
	a, b := r.startStudent("student-a"), r.startStudent("student-b")
	r.finish([]*proc{a, b}, want, wantPPL)
	m := regexp.MustCompile(`msg="new run" .* train_windows=(\d+)`).FindStringSubmatch(r.coord.out.String())
	if m == nil {
		t.Fatal("the coordinator did not log the run's training windows")
	}
	windows, _ := strconv.Atoi(m[1]) // one epoch
	twice := checkSplit(t, []*proc{a, b}, []*proc{a, b}, windows, 0)
	r.ok = !t.Failed()
	t.Logf("acceptance run: %d and %d of %d windows, computed twice: %v; stopped after the run: %v; %v", len(windowsComputed(a)),
		len(windowsComputed(b)), windows, twice, r.stopped, time.Since(t0).Round(time.Millisecond))
	if t.Failed() {
		return
	}

	// The base of the trials: a run whose cache is complete and whose distillation has not
	// begun, copied as it was when its coordinator was killed.
	t0 = time.Now()
	base := newDPRun(t, fx, "base")
	base.startCoordinator()
	base.startCacheAndTeachers()
	waitLog(t, base.coord, "cache phase done", 2*time.Minute)
	base.coord.kill()
	_ = base.coord.wait(t, 10*time.Second)
	for _, p := range base.procs {
		p.kill()
	}
	base.ok = true
	t.Logf("trial base: %v", time.Since(t0).Round(time.Millisecond))

	trials := 10
	if testing.Short() {
		trials = 2
	}
	for seed := range trials {
		kind := []string{"restart", "alone", "third"}[seed%3]
		t.Run(fmt.Sprintf("seed%d-%s", seed, kind), func(t *testing.T) {
			t0 := time.Now()
			rng := rand.New(rand.NewPCG(uint64(seed), 23))
			r := newDPRun(t, fx, fmt.Sprint("trial", seed))
			copyTree(t, base.runDir, r.runDir)
			r.startCoordinator()
			live := []*proc{r.startStudent("student-a"), r.startStudent("student-b")}
			all := append([]*proc(nil), live...)
			if kind == "third" {
				join := 1 + rng.IntN(steps/3)
				waitStep(t, live, join, time.Minute)
				r.requireRunning(fmt.Sprintf("the third student was started (step %d)", join))
				live = append(live, r.startStudent("student-c"))
				all = append(all, live[2])
			}
			i := rng.IntN(len(live))
			victim := live[i]
			at := steps/3 + rng.IntN(steps/3)
			if kind != "third" {
				at = 1 + rng.IntN(2*steps/3)
			}
			waitStep(t, live, at, time.Minute)
			time.Sleep(time.Duration(rng.IntN(15)) * time.Millisecond) // into a window (about 10 ms each) or a wait for the others'
			victim.kill()
			_ = victim.wait(t, 10*time.Second)
			r.requireRunning(fmt.Sprintf("%s was killed (at step %d)", victim.name, at))
			live = append(live[:i:i], live[i+1:]...)
			if kind == "restart" {
				time.Sleep(time.Duration(rng.IntN(300)) * time.Millisecond)
				live = append(live, r.startStudent("student-"+victim.name[len("student-"):]+"2"))
				all = append(all, live[len(live)-1])
			}
			r.finish(live, want, wantPPL)
			if succ := live[len(live)-1]; kind == "restart" && at >= 5 {
				// It joined from the run's shared checkpoint (the others had saved one at step 5
				// or later), not from P0 — when it joined at all: under load the student left
				// alone may finish the run (windows of a few ms) before the restarted process
				// has loaded its model, and then there is nothing to join.
				out := succ.out.String()
				m := regexp.MustCompile(`msg="student: resuming" .*step=(\d+) .*from="the shared checkpoint"`).FindStringSubmatch(out)
				switch {
				case m != nil && m[1] != "0":
				case m == nil && !strings.Contains(out, "student: window computed"):
					t.Logf("%s did not get to join before the run ended", succ.name)
				default:
					t.Errorf("%s did not join from a shared checkpoint after step 0 (%v)", succ.name, m)
				}
			}
			redone := checkSplit(t, all, nil, windows, 1)
			takeovers := 0
			for _, p := range all {
				takeovers += strings.Count(p.out.String(), "taking over a window whose claim expired")
			}
			t.Logf("%s killed at step %d; %d students to the end (stopped after it: %v); windows computed twice: %v; %d claims taken over; %v",
				victim.name, at, len(live), r.stopped, redone, takeovers, time.Since(t0).Round(time.Millisecond))
		})
	}
	mode := "full"
	if testing.Short() {
		mode = "-short"
	}
	t.Logf("TestDataParallelStudents (%s, %d trials): %v", mode, trials, time.Since(began).Round(time.Millisecond))
}
