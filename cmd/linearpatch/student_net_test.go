package main

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"linearpatch/worker"
)

// netRun is a distributed run with every worker a separate process with its own working
// directory; only NATS joins them: the coordinator's embedded server on a fixed loopback
// port (a restarted coordinator serves it again), which admits only the run's role keys.
type netRun struct {
	t      *testing.T
	fx     pipelineFixture
	base   string
	url    string
	run    string
	creds  string // the run's role keys, RUN-DIR/creds
	coord  *proc
	args   []string // the coordinator's
	others []*proc
}

func startNetRun(t *testing.T, fx pipelineFixture, name string, train []string) *netRun {
	t.Helper()
	base := filepath.Join(fx.dir, name)
	port := freePort(t)
	n := &netRun{t: t, fx: fx, base: base, url: fmt.Sprintf("nats://127.0.0.1:%d", port)}
	t.Cleanup(func() {
		if t.Failed() {
			for _, p := range append([]*proc{n.coord}, n.others...) {
				if p != nil {
					t.Logf("==== %s ====\n%s", p.name, tail(p.out.String(), 3000))
				}
			}
		}
	})
	runDir := filepath.Join(base, "coordinator", "run")
	n.creds = filepath.Join(runDir, "creds")
	args := append(append(append([]string{"coordinator", "--nats-listen", fmt.Sprintf("127.0.0.1:%d", port), "--threads", "1"},
		fx.settingsArgs()...), train...),
		"--out", filepath.Join(base, "coordinator", "out"), "--run-dir", runDir, "--ack-wait", "2s", "--lease", "4s")
	n.args = args
	n.coord = startProc(t, "coordinator", nil, args...)
	waitFile(t, filepath.Join(runDir, "nats.url"), 30*time.Second)
	b, err := os.ReadFile(filepath.Join(runDir, "run.id"))
	if err != nil {
		t.Fatal(err)
	}
	n.run = strings.TrimSpace(string(b))
	n.others = append(n.others, startProc(t, "cache", nil, append(append([]string{"cache"}, n.join(worker.RoleCache)...), "--model", fx.model,
		"--dir", filepath.Join(base, "cache-writer"))...))
	for i := range 2 {
		n.others = append(n.others, startProc(t, fmt.Sprint("teacher ", i), nil, append(append([]string{"teacher"}, n.join(worker.RoleTeacher)...),
			"--model", fx.model, "--threads", "1", "--name", fmt.Sprint("t", i), "--ack-wait", "2s", "--slow-window", "20ms")...))
	}
	return n
}

// join are the flags with which a process of role joins the run: its URL, id and
// the role's key file.
func (n *netRun) join(role worker.Role) []string {
	return []string{"--nats", n.url, "--run", n.run, "--nats-nkey", worker.CredsFile(n.creds, role)}
}

// startStudent starts a student in dir. Its lease is short: the claim a killed student held
// is taken over by its successor within seconds.
func (n *netRun) startStudent(dir string) *proc {
	p := startProc(n.t, "student "+filepath.Base(dir), nil, append(append([]string{"student"}, n.join(worker.RoleStudent)...), "--model", n.fx.model,
		"--threads", "1", "--dir", filepath.Join(n.base, dir), "--student-lease", "2s")...)
	n.others = append(n.others, p)
	return p
}

// waitLog waits until p's output holds s.
func waitLog(t *testing.T, p *proc, s string, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if strings.Contains(p.out.String(), s) {
			return
		}
		select {
		case err := <-p.done:
			p.done <- err
			t.Fatalf("%s exited (%v) before logging %q", p.name, err, s)
		case <-time.After(20 * time.Millisecond):
		}
	}
	t.Fatalf("%s did not log %q in %v", p.name, s, d)
}

// netStudentArgs are the distillation settings of the network student test: long enough
// (about 3000 steps) for status to see the student training and for a kill to land mid-run.
var netStudentArgs = []string{"--epochs", "80", "--checkpoint-every", "7", "--lr", "1e-3"}

// TestNetworkStudent: the coordinator (its embedded NATS server), the cache writer, two
// teachers and a network student, each a separate process with its own working directory
// and logged in with its role's key, give a distilled patch bit-identical to `run`'s with
// the same settings; so does a run whose student is killed with SIGKILL at a seeded moment
// and restarted in another directory (it resumes from the checkpoint in the run's object
// store and fetches its shards again), and one whose coordinator, and with it the server,
// is killed and restarted while the student trains.
func TestNetworkStudent(t *testing.T) {
	fx := newPipelineFixture(t)
	ref := filepath.Join(fx.dir, "ref-net")
	if _, err := runCLI(t, append(append(append([]string{"run", "--threads", "1"}, fx.settingsArgs()...), netStudentArgs...),
		"--out", filepath.Join(ref, "out"), "--run-dir", filepath.Join(ref, "run"), "--teachers", "1")...); err != nil {
		t.Fatal(err)
	}
	want := readPatch(t, filepath.Join(ref, "out"))
	// One trial of each kind; TestDataParallelStudents kills students in ten more (every
	// network student runs the same shared-step code). -short keeps the coordinator kill.
	seeds := []int{0, 1, 2}
	if testing.Short() {
		seeds = []int{2}
	}
	for _, seed := range seeds {
		kill := []string{"none", "student", "coordinator"}[seed%3]
		t.Run(fmt.Sprintf("seed%d-kill-%s", seed, kill), func(t *testing.T) {
			n := startNetRun(t, fx, fmt.Sprint("net", seed), netStudentArgs)
			st := n.startStudent("student-a")
			if kill == "coordinator" {
				// The coordinator killed while the student trains (its server with it), restarted
				// on the same port: it resumes the run and waits for the student's patch again;
				// the student reconnects and retries what failed meanwhile.
				rng := rand.New(rand.NewPCG(uint64(seed), 13))
				waitLog(t, st, "checkpoint saved", time.Minute)
				time.Sleep(time.Duration(rng.IntN(400)) * time.Millisecond)
				n.coord.kill()
				_ = n.coord.wait(t, 10*time.Second)
				select {
				case err := <-st.done:
					st.done <- err
					t.Fatalf("the student had finished (%v) when the coordinator was killed: the trial tests nothing", err)
				default:
				}
				n.others = append(n.others, n.coord)
				n.coord = startProc(t, "coordinator again", nil, n.args...)
			}
			if kill == "student" {
				rng := rand.New(rand.NewPCG(uint64(seed), 11))
				early := seed >= 3 // killed while it waits for or fetches shards, before any checkpoint
				if early {
					waitLog(t, st, "student joined the run", time.Minute)
					time.Sleep(time.Duration(rng.IntN(300)) * time.Millisecond)
				} else {
					waitLog(t, st, "checkpoint saved", time.Minute)
				}
				// status shows the student (it reports at most once a second; the coordinator's
				// own status every 2 s).
				var out string
				for deadline := time.Now().Add(10 * time.Second); !early; {
					var err error
					out, err = runCLI(t, append([]string{"status"}, n.join(worker.RoleStatus)...)...)
					if err == nil && strings.Contains(out, "student: training, step ") && strings.Contains(out, "tokens/s, ETA ") {
						break
					}
					if time.Now().After(deadline) {
						t.Fatalf("status does not show the training student: %v\n%s", err, out)
					}
					time.Sleep(200 * time.Millisecond)
				}
				if !early {
					t.Log(strings.TrimSpace(out[strings.Index(out, "student: "):]))
					time.Sleep(time.Duration(rng.IntN(400)) * time.Millisecond)
				}
				st.kill()
				_ = st.wait(t, 10*time.Second)
				select {
				case err := <-n.coord.done:
					t.Fatalf("the coordinator had finished (%v) when the student was killed: the trial tests nothing", err)
				default:
				}
				st = n.startStudent("student-b")
				if !early {
					waitLog(t, st, "student: resuming", time.Minute)
				}
				for _, l := range strings.Split(st.out.String(), "\n") {
					if strings.Contains(l, "student: resuming") {
						if strings.Contains(l, "step=0 ") {
							t.Fatalf("the restarted student did not resume from a checkpoint: %s", l)
						}
						t.Log(l)
					}
				}
			}
			if err := st.wait(t, 3*time.Minute); err != nil {
				t.Fatalf("student: %v\n%s", err, tail(st.out.String(), 4000))
			}
			if err := n.coord.wait(t, 2*time.Minute); err != nil {
				t.Fatalf("coordinator: %v\n%s", err, tail(n.coord.out.String(), 4000))
			}
			out := n.coord.out.String()
			if !strings.Contains(out, "\nstudent: ") {
				t.Fatalf("the coordinator's summary lacks the student's line:\n%s", tail(out, 3000))
			}
			// The shards the student rebuilt from the data stream are the cache writer's files,
			// byte for byte (same compression).
			last := "student-a"
			if kill == "student" {
				last = "student-b" // it started with an empty directory
			}
			writer, fetched := manifestSums(t, filepath.Join(n.base, "cache-writer")), manifestSums(t, filepath.Join(n.base, last, "cache"))
			if len(fetched) != len(writer) {
				t.Fatalf("the student fetched %d shards, the cache writer wrote %d", len(fetched), len(writer))
			}
			if len(fetched) == 0 {
				t.Fatal("the student fetched no shard")
			}
			for shard, sum := range fetched {
				if writer[shard] != sum {
					t.Fatalf("shard %d rebuilt by the student differs from the cache writer's file", shard)
				}
			}
			rec, err := os.ReadFile(filepath.Join(n.base, "coordinator", "out", "linearpatch.json"))
			if err != nil || !strings.Contains(string(rec), `"method": "kd"`) || !strings.Contains(string(rec), `"init_method": "rotate"`) {
				t.Fatalf("the exported record is not the kd model's (%v):\n%s", err, rec)
			}
			got := readPatch(t, filepath.Join(n.base, "coordinator", "out"))
			if len(got) != len(want) {
				t.Fatalf("patch of %d values, reference %d", len(got), len(want))
			}
			for i := range want {
				if got[i] != want[i] {
					t.Fatalf("element %d of the network student's patch is %v, run's %v", i, got[i], want[i])
				}
			}
		})
	}
}

// TestNetworkStudentRefusals: the network student's bad inputs are clear errors before it
// connects: training flags (the run's settings apply), the offline student's flags, no run id.
func TestNetworkStudentRefusals(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--nats", "nats://127.0.0.1:1", "--run", "r1", "--model", "m", "--lr", "1e-3"}, "--lr: with --nats"},
		{[]string{"--nats", "nats://127.0.0.1:1", "--run", "r1", "--model", "m", "--epochs", "2"}, "--epochs: with --nats"},
		{[]string{"--nats", "nats://127.0.0.1:1", "--run", "r1", "--model", "m", "--out", "x"}, "for the offline student"},
		{[]string{"--nats", "nats://127.0.0.1:1", "--model", "m"}, "needs --nats and --run"},
		{[]string{"--run", "r1", "--model", "m"}, "needs --nats and --run"},
		{[]string{"--nats", "nats://127.0.0.1:1", "--run", "r1"}, "--model is required"},
		{[]string{"--nats", "nats://127.0.0.1:1", "--run", "bad id", "--model", "m"}, "run id"},
	} {
		out, err := runCLI(t, append([]string{"student"}, c.args...)...)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("student %v: %v (want an error containing %q)\n%s", c.args, err, c.want, out)
		}
	}
}
