package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"linearpatch/metrics"
	"linearpatch/shards"
	"linearpatch/worker"
)

// scraper polls a --metrics-listen endpoint and keeps every successful scrape.
type scraper struct {
	url   string
	mu    sync.Mutex
	seen  []map[string]float64
	stop  chan struct{}
	ended chan struct{}
}

func startScraper(t *testing.T, addr string) *scraper {
	s := &scraper{url: "http://" + addr + metrics.Path, stop: make(chan struct{}), ended: make(chan struct{})}
	go func() {
		defer close(s.ended)
		client := &http.Client{Timeout: time.Second}
		for {
			select {
			case <-s.stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			resp, err := client.Get(s.url)
			if err != nil {
				continue
			}
			b, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil || resp.StatusCode != http.StatusOK {
				continue
			}
			m, err := metrics.Parse(string(b))
			if err != nil {
				t.Errorf("%s: %v", s.url, err)
				continue
			}
			s.mu.Lock()
			s.seen = append(s.seen, m)
			s.mu.Unlock()
		}
	}()
	t.Cleanup(s.halt)
	return s
}

func (s *scraper) halt() {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	<-s.ended
}

// series returns the values key took over the scrapes that had it.
func (s *scraper) series(key string) []float64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []float64
	for _, m := range s.seen {
		if v, ok := m[key]; ok {
			out = append(out, v)
		}
	}
	return out
}

// checkGrows fails unless key was scraped at least twice, never decreased, rose during the
// run, and ended ≤ most (when most ≥ 0).
func checkGrows(t *testing.T, s *scraper, key string, most float64) {
	t.Helper()
	v := s.series(key)
	if len(v) < 2 {
		t.Errorf("%s: %s scraped %d times", s.url, key, len(v))
		return
	}
	for i := 1; i < len(v); i++ {
		if v[i] < v[i-1] {
			t.Errorf("%s: %s decreased from %v to %v", s.url, key, v[i-1], v[i])
		}
	}
	if v[len(v)-1] <= v[0] {
		t.Errorf("%s: %s did not change while the run worked (%v … %v over %d scrapes)", s.url, key, v[0], v[len(v)-1], len(v))
	}
	if most >= 0 && v[len(v)-1] > most {
		t.Errorf("%s: %s reached %v, more than the run's %v", s.url, key, v[len(v)-1], most)
	}
}

// checkClosingLine finds p's log line msg and checks its integer fields.
func checkClosingLine(t *testing.T, p *proc, msg string, want map[string]int64) {
	t.Helper()
	var line string
	for _, l := range strings.Split(p.out.String(), "\n") {
		if strings.Contains(l, "msg=\""+msg+"\"") {
			line = l
		}
	}
	if line == "" {
		t.Errorf("%s logged no %q line:\n%s", p.name, msg, tail(p.out.String(), 2000))
		return
	}
	for k, v := range want {
		if !strings.Contains(line, fmt.Sprintf(" %s=%d", k, v)) {
			t.Errorf("%s: %q line lacks %s=%d: %s", p.name, msg, k, v, line)
		}
	}
}

// TestMetricsListen runs coordinator, cache writer and a teacher as processes, each with
// --metrics-listen, and scrapes them while the run works: shards done, tokens, bytes written
// follow the work, and end at most at the run's totals.
func TestMetricsListen(t *testing.T) {
	fx := newPipelineFixture(t)
	d := newDistributed(t, fx, "metrics")
	addr := func() string { return fmt.Sprintf("127.0.0.1:%d", freePort(t)) }
	coordAddr, cacheAddr, teacherAddr := addr(), addr(), addr()
	d.startCoordinator("--metrics-listen", coordAddr)
	coord := startScraper(t, coordAddr)
	d.cache = startProc(t, "cache", nil, "cache", "--run-dir", d.runDir, "--model", fx.model, "--metrics-listen", cacheAddr)
	cache := startScraper(t, cacheAddr)
	d.teachers = append(d.teachers, startProc(t, "teacher 0", nil, "teacher", "--run-dir", d.runDir, "--model", fx.model,
		"--threads", "1", "--slow-window", "40ms", "--name", "t0", "--ack-wait", "2s", "--metrics-listen", teacherAddr))
	teacher := startScraper(t, teacherAddr)
	if err := d.coord.wait(t, 3*time.Minute); err != nil {
		t.Fatalf("coordinator failed: %v\n%s", err, tail(d.coord.out.String(), 4000))
	}
	// The embedded server went with the coordinator: the cache writer and the teacher exit
	// when they see the run done, or wait for the server to come back (then SIGTERM ends
	// them). A process's last increments may fall after its last scrape, so the scrapes must
	// only grow towards the run's totals; the totals themselves are checked in each
	// process's closing log line.
	time.Sleep(500 * time.Millisecond)
	coord.halt()
	cache.halt()
	teacher.halt()
	for _, p := range []*proc{d.cache, d.teachers[0]} {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		if err := p.wait(t, time.Minute); err != nil {
			t.Logf("%s: %v", p.name, err)
		}
	}

	m, err := shards.LoadManifest(filepath.Join(d.runDir, "cache", "manifest.json"))
	if err != nil {
		t.Fatal(err)
	}
	var bytes, tokens int64
	for _, e := range m.Shards {
		bytes += e.Bytes
		tokens += int64(e.Tokens)
	}
	n := float64(len(m.Shards))
	checkGrows(t, coord, `linearpatch_run_shards{phase="cache",state="done"}`, n)
	if p := coord.series(`linearpatch_run_shards_planned{phase="cache"}`); len(p) == 0 || p[len(p)-1] != n {
		t.Errorf("coordinator: planned cache shards %v, the cache has %v", p, n)
	}
	// The writer and the only teacher did all the cache's work, once.
	checkGrows(t, cache, `linearpatch_cache_shards_written_total`, n)
	checkGrows(t, cache, `linearpatch_cache_bytes_written_total`, float64(bytes))
	checkGrows(t, cache, `linearpatch_cache_tokens_written_total`, float64(tokens))
	checkGrows(t, teacher, `linearpatch_teacher_tokens_total{phase="cache"}`, float64(tokens))
	checkGrows(t, teacher, `linearpatch_teacher_shards_total{phase="cache"}`, n)
	checkClosingLine(t, d.cache, "cache writer finished", map[string]int64{
		"shards_written": int64(len(m.Shards)), "bytes_written": bytes, "tokens_written": tokens})
	checkClosingLine(t, d.teachers[0], "teacher finished", map[string]int64{
		"cache_shards": int64(len(m.Shards)), "cache_tokens": tokens})
	checkGrows(t, teacher, `linearpatch_teacher_published_bytes_total`, -1)
	if r := teacher.series(`linearpatch_teacher_tokens_per_second`); len(r) == 0 || r[len(r)-1] <= 0 {
		t.Errorf("teacher: tokens per second %v", r)
	}
	if r := coord.series(`linearpatch_run_teacher_tokens_per_second{teacher="t0"}`); len(r) == 0 || r[len(r)-1] <= 0 {
		t.Errorf("coordinator: teacher t0's tokens per second %v", r)
	}
	// Each process exposes the metrics of the work it does, not zeros for another's.
	for _, c := range []struct {
		s       *scraper
		foreign []string
	}{
		{coord, []string{"linearpatch_cache_", "linearpatch_teacher_", "linearpatch_student_"}},
		{cache, []string{"linearpatch_run_", "linearpatch_teacher_", "linearpatch_student_"}},
		{teacher, []string{"linearpatch_run_", "linearpatch_cache_", "linearpatch_student_"}},
	} {
		c.s.mu.Lock()
		for _, m := range c.s.seen {
			for k := range m {
				for _, f := range c.foreign {
					if strings.HasPrefix(k, f) {
						t.Errorf("%s exposes %s", c.s.url, k)
					}
				}
			}
		}
		c.s.mu.Unlock()
	}

	// A port already taken is an error at once.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	busy := startProc(t, "teacher on a busy port", nil, "teacher", "--run-dir", d.runDir, "--model", fx.model, "--metrics-listen", l.Addr().String())
	if err := busy.wait(t, 30*time.Second); err == nil || !strings.Contains(busy.out.String(), "address already in use") {
		t.Fatalf("a teacher whose --metrics-listen port is taken did not fail clearly (%v):\n%s", err, tail(busy.out.String(), 2000))
	}
}

// TestStudentMetrics runs the offline student as a process with --metrics-listen and
// scrapes it while it trains: its step rises to the steps it reports at the end, and the
// loss and tokens/s are set.
func TestStudentMetrics(t *testing.T) {
	fx := newPipelineFixture(t)
	runDir := cacheOnlyRun(t, fx)
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	p := startProc(t, "student", nil, "student", "--run-dir", runDir, "--out", filepath.Join(fx.dir, "student-out"),
		"--epochs", "10", "--lr", "1e-3", "--checkpoint-every", "50", "--json", "--metrics-listen", addr)
	s := startScraper(t, addr)
	if err := p.wait(t, 3*time.Minute); err != nil {
		t.Fatalf("student failed: %v\n%s", err, tail(p.out.String(), 3000))
	}
	s.halt()
	var res studentJSON
	lastJSON(t, p.out.String(), &res)
	planned := s.series(`linearpatch_student_steps_planned`)
	if len(planned) == 0 || planned[len(planned)-1] != float64(res.Steps) {
		t.Fatalf("steps planned %v, the student took %d", planned, res.Steps)
	}
	checkGrows(t, s, `linearpatch_student_step`, float64(res.Steps))
	checkGrows(t, s, `linearpatch_student_steps_total`, float64(res.Steps))
	for _, key := range []string{`linearpatch_student_loss`, `linearpatch_student_tokens_per_second`} {
		if v := s.series(key); len(v) == 0 || !(v[len(v)-1] > 0) {
			t.Errorf("%s: %v", key, v)
		}
	}
}

// TestNetworkStudentMetrics: a network student (`student --nats`) serves its metrics with
// --metrics-listen while it trains: its step rises to the steps the run plans.
func TestNetworkStudentMetrics(t *testing.T) {
	fx := newPipelineFixture(t)
	n := startNetRun(t, fx, "netmetrics", []string{"--epochs", "20", "--checkpoint-every", "50", "--lr", "1e-3"})
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	p := startProc(t, "student", nil, append(append([]string{"student"}, n.join(worker.RoleStudent)...), "--model", fx.model,
		"--threads", "1", "--dir", filepath.Join(n.base, "student"), "--metrics-listen", addr)...)
	n.others = append(n.others, p)
	s := startScraper(t, addr)
	if err := p.wait(t, 3*time.Minute); err != nil {
		t.Fatalf("student failed: %v\n%s", err, tail(p.out.String(), 3000))
	}
	s.halt()
	planned := s.series(`linearpatch_student_steps_planned`)
	if len(planned) == 0 || planned[len(planned)-1] <= 0 {
		t.Fatalf("steps planned %v", planned)
	}
	checkGrows(t, s, `linearpatch_student_step`, planned[len(planned)-1])
	if v := s.series(`linearpatch_student_loss`); len(v) == 0 || !(v[len(v)-1] > 0) {
		t.Errorf("loss %v", v)
	}
}
