package metrics

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// scrape fetches url and returns the value of every sample, keyed by its name and labels
// as the text format writes them (e.g. `linearpatch_run_shards{phase="cache",state="done"}`).
func scrape(t *testing.T, url string) map[string]float64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	samples, err := Parse(string(b))
	if err != nil {
		t.Fatal(err)
	}
	return samples
}

func TestServeAndScrape(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r := New()
	srv, err := r.Serve(ctx, "127.0.0.1:0", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	url := "http://" + srv.Addr().String() + Path

	co, te, ca, st := r.Coordinator(), r.Teacher(), r.CacheWriter(), r.Student()
	if r.Teacher() != te || r.Coordinator() != co {
		t.Fatal("a second call registered the metrics again")
	}
	co.SetPhase("cache")
	co.SetShards("cache", 3, 2, 17, 22)
	co.Teacher("t0", 1234.5, 99)
	te.Tokens("cache", 64)
	te.Published(1000)
	te.ShardDone("cache")
	te.Redelivered()
	ca.ShardWritten(4096, 64, 1)
	st.Step(StepInfo{Step: 7, TotalSteps: 39, Loss: 0.25, ValidLoss: 0.5, LR: 1e-3, TokensPerSec: 800})

	got := scrape(t, url)
	want := map[string]float64{
		`linearpatch_run_phase{phase="cache"}`:                    1,
		`linearpatch_run_phase{phase="stats"}`:                    0,
		`linearpatch_run_shards{phase="cache",state="done"}`:      3,
		`linearpatch_run_shards{phase="cache",state="leased"}`:    2,
		`linearpatch_run_shards{phase="cache",state="pending"}`:   17,
		`linearpatch_run_shards_planned{phase="cache"}`:           22,
		`linearpatch_run_teacher_tokens_per_second{teacher="t0"}`: 1234.5,
		`linearpatch_teacher_tokens_total{phase="cache"}`:         64,
		`linearpatch_teacher_published_bytes_total`:               1000,
		`linearpatch_teacher_shards_total{phase="cache"}`:         1,
		`linearpatch_teacher_task_redeliveries_total`:             1,
		`linearpatch_cache_bytes_written_total`:                   4096,
		`linearpatch_cache_shards_written_total`:                  1,
		`linearpatch_student_step`:                                7,
		`linearpatch_student_loss`:                                0.25,
		`linearpatch_student_tokens_per_second`:                   800,
	}
	for k, v := range want {
		if g, ok := got[k]; !ok || g != v {
			t.Errorf("%s = %v (present %v), want %v", k, g, ok, v)
		}
	}
	if _, ok := got["go_goroutines"]; !ok {
		t.Error("no Go runtime metrics")
	}

	// The values follow the work.
	te.Tokens("cache", 36)
	ca.ShardWritten(100, 36, 2)
	got = scrape(t, url)
	if got[`linearpatch_teacher_tokens_total{phase="cache"}`] != 100 || got[`linearpatch_cache_bytes_written_total`] != 4196 || got[`linearpatch_cache_shards`] != 2 {
		t.Errorf("the metrics did not follow the work: %v %v %v", got[`linearpatch_teacher_tokens_total{phase="cache"}`],
			got[`linearpatch_cache_bytes_written_total`], got[`linearpatch_cache_shards`])
	}
	cancel()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := http.Get(url); err != nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Error("the server still answers after its context ended")
}

func TestNilMetricsDoNothing(t *testing.T) {
	var co *Coordinator
	var te *Teacher
	var ca *CacheWriter
	var st *Student
	co.SetPhase("cache")
	co.SetShards("cache", 1, 1, 1, 3)
	co.Teacher("x", 1, 1)
	co.DeadLetter("cache")
	te.Tokens("cache", 1)
	te.Published(1)
	te.ShardDone("cache")
	te.Redelivered()
	te.SetRate(1)
	ca.ShardWritten(1, 1, 1)
	ca.SetShards(1)
	ca.Redelivered()
	st.Step(StepInfo{})
}

func TestServeErrors(t *testing.T) {
	ctx := context.Background()
	r := New()
	for _, addr := range []string{"", "nonsense", "127.0.0.1:notaport"} {
		if _, err := r.Serve(ctx, addr, nil); err == nil {
			t.Errorf("Serve(%q) succeeded", addr)
		}
	}
	srv, err := r.Serve(ctx, "127.0.0.1:0", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if _, err := New().Serve(ctx, srv.Addr().String(), nil); err == nil || !strings.Contains(err.Error(), "address already in use") {
		t.Errorf("a second server on %s: %v, want address already in use", srv.Addr(), err)
	}
}
