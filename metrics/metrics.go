// Package metrics exposes the pipeline's workers to Prometheus: one registry per process
// (Registry), served on --metrics-listen at /metrics, holding the metrics of each worker the
// process runs (Coordinator, Teacher, CacheWriter, Student) beside the Go runtime's and the
// process's own.
//
// Every method of the worker types is safe on a nil receiver and then does nothing, so the
// packages that report (coordinator, teacher, cache) take an optional *metrics.X in their
// options and need no check of their own.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Namespace prefixes every metric name.
const Namespace = "linearpatch"

// Path is where Serve exposes the metrics.
const Path = "/metrics"

// Registry is one process's metrics. A nil *Registry hands out nil worker metrics, which
// record nothing.
type Registry struct {
	reg *prometheus.Registry
	mu  sync.Mutex
	// the worker metrics already registered, so that a process running, say, two teachers
	// (run --teachers 2) shares one set of series instead of failing to register twice
	coordinator *Coordinator
	teacher     *Teacher
	cache       *CacheWriter
	student     *Student
}

// New returns a registry holding the Go runtime and process collectors.
func New() *Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return &Registry{reg: reg}
}

// Gatherer is the registry, for tests and custom handlers.
func (r *Registry) Gatherer() prometheus.Gatherer { return r.reg }

// Handler serves the registry in the Prometheus text (or OpenMetrics) format.
func (r *Registry) Handler() http.Handler {
	return promhttp.HandlerFor(r.reg, promhttp.HandlerOpts{Registry: r.reg, EnableOpenMetrics: true})
}

// Server is a running metrics endpoint.
type Server struct {
	srv  *http.Server
	addr net.Addr
	done chan error
}

// Addr is the address the server listens on (with the port chosen for port 0).
func (s *Server) Addr() net.Addr { return s.addr }

// Close stops the server at once.
func (s *Server) Close() error {
	err := s.srv.Close()
	<-s.done
	return err
}

// Serve listens on addr (HOST:PORT; port 0 picks a free one) and serves the registry at
// Path until ctx ends or Close. It fails at once when addr cannot be listened on.
func (r *Registry) Serve(ctx context.Context, addr string, log *slog.Logger) (*Server, error) {
	if addr == "" {
		return nil, errors.New("metrics: empty listen address")
	}
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return nil, fmt.Errorf("metrics: listen address %q: %w", addr, err)
	}
	l, err := (&net.ListenConfig{}).Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle(Path, r.Handler())
	s := &Server{srv: &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}, addr: l.Addr(), done: make(chan error, 1)}
	go func() {
		err := s.srv.Serve(l)
		if errors.Is(err, http.ErrServerClosed) {
			err = nil
		}
		if err != nil && log != nil {
			log.Error("metrics server stopped", "err", err)
		}
		s.done <- err
	}()
	go func() {
		<-ctx.Done()
		_ = s.srv.Close()
	}()
	if log != nil {
		log.Info("serving metrics", "addr", "http://"+l.Addr().String()+Path)
	}
	return s, nil
}

// Coordinator is a coordinator's view of its run.
type Coordinator struct {
	shards       *prometheus.GaugeVec
	planned      *prometheus.GaugeVec
	phase        *prometheus.GaugeVec
	teacherRate  *prometheus.GaugeVec
	teacherToken *prometheus.GaugeVec
	deadLetters  *prometheus.CounterVec
}

// Phases are the values of the phase label of linearpatch_run_phase.
var Phases = []string{"stats", "cache", "student", "done"}

// Coordinator returns the registry's coordinator metrics (registering them once).
func (r *Registry) Coordinator() *Coordinator {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.coordinator != nil {
		return r.coordinator
	}
	c := &Coordinator{
		shards: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: Namespace, Subsystem: "run", Name: "shards",
			Help: "Shards of the run by phase and state: done, leased (a teacher reports working on it) or pending."}, []string{"phase", "state"}),
		planned: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: Namespace, Subsystem: "run", Name: "shards_planned",
			Help: "Shards the run's plan has, by phase."}, []string{"phase"}),
		phase: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: Namespace, Subsystem: "run", Name: "phase",
			Help: "1 for the run's current phase, 0 for the others."}, []string{"phase"}),
		teacherRate: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: Namespace, Subsystem: "run", Name: "teacher_tokens_per_second",
			Help: "Tokens per second each teacher last reported."}, []string{"teacher"}),
		teacherToken: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: Namespace, Subsystem: "run", Name: "teacher_tokens",
			Help: "Tokens each teacher last reported having computed since it started."}, []string{"teacher"}),
		deadLetters: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "run", Name: "dead_letters_total",
			Help: "Shard tasks that failed every delivery, by phase."}, []string{"phase"}),
	}
	r.reg.MustRegister(c.shards, c.planned, c.phase, c.teacherRate, c.teacherToken, c.deadLetters)
	r.coordinator = c
	return c
}

// SetShards records a phase's shard counts.
func (c *Coordinator) SetShards(phase string, done, leased, pending, planned int) {
	if c == nil {
		return
	}
	c.shards.WithLabelValues(phase, "done").Set(float64(done))
	c.shards.WithLabelValues(phase, "leased").Set(float64(leased))
	c.shards.WithLabelValues(phase, "pending").Set(float64(pending))
	c.planned.WithLabelValues(phase).Set(float64(planned))
}

// SetPhase records the run's current phase.
func (c *Coordinator) SetPhase(phase string) {
	if c == nil {
		return
	}
	for _, p := range Phases {
		v := 0.0
		if p == phase {
			v = 1
		}
		c.phase.WithLabelValues(p).Set(v)
	}
}

// Teacher records a teacher's progress report.
func (c *Coordinator) Teacher(name string, tokensPerSec float64, totalTokens int64) {
	if c == nil {
		return
	}
	c.teacherRate.WithLabelValues(name).Set(tokensPerSec)
	c.teacherToken.WithLabelValues(name).Set(float64(totalTokens))
}

// DeadLetter counts a dead-lettered task.
func (c *Coordinator) DeadLetter(phase string) {
	if c == nil {
		return
	}
	c.deadLetters.WithLabelValues(phase).Inc()
}

// Teacher is a teacher worker's (or, in one process, all its teachers') work.
type Teacher struct {
	shards       *prometheus.CounterVec
	tokens       *prometheus.CounterVec
	bytes        prometheus.Counter
	redeliveries prometheus.Counter
	rate         prometheus.Gauge
}

// Teacher returns the registry's teacher metrics (registering them once).
func (r *Registry) Teacher() *Teacher {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.teacher != nil {
		return r.teacher
	}
	t := &Teacher{
		shards: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "teacher", Name: "shards_total",
			Help: "Shards computed and published, by phase."}, []string{"phase"}),
		tokens: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "teacher", Name: "tokens_total",
			Help: "Tokens run through the model, by phase."}, []string{"phase"}),
		bytes: prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "teacher", Name: "published_bytes_total",
			Help: "Bytes of records published to the data stream."}),
		redeliveries: prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "teacher", Name: "task_redeliveries_total",
			Help: "Shard tasks received again after an earlier delivery (to this or another teacher) was not acked."}),
		rate: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: Namespace, Subsystem: "teacher", Name: "tokens_per_second",
			Help: "Tokens per second since the teacher started."}),
	}
	r.reg.MustRegister(t.shards, t.tokens, t.bytes, t.redeliveries, t.rate)
	r.teacher = t
	return t
}

// Tokens counts tokens computed in phase.
func (t *Teacher) Tokens(phase string, n int64) {
	if t == nil {
		return
	}
	t.tokens.WithLabelValues(phase).Add(float64(n))
}

// Published counts bytes published.
func (t *Teacher) Published(bytes int) {
	if t == nil {
		return
	}
	t.bytes.Add(float64(bytes))
}

// ShardDone counts a shard published in full.
func (t *Teacher) ShardDone(phase string) {
	if t == nil {
		return
	}
	t.shards.WithLabelValues(phase).Inc()
}

// Redelivered counts a task delivered more than once.
func (t *Teacher) Redelivered() {
	if t == nil {
		return
	}
	t.redeliveries.Inc()
}

// SetRate records the tokens per second.
func (t *Teacher) SetRate(tokensPerSec float64) {
	if t == nil {
		return
	}
	t.rate.Set(tokensPerSec)
}

// CacheWriter is the cache writer's output.
type CacheWriter struct {
	shards       prometheus.Counter
	bytes        prometheus.Counter
	tokens       prometheus.Counter
	redeliveries prometheus.Counter
	onDisk       prometheus.Gauge
}

// CacheWriter returns the registry's cache writer metrics (registering them once).
func (r *Registry) CacheWriter() *CacheWriter {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cache != nil {
		return r.cache
	}
	c := &CacheWriter{
		shards: prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "cache", Name: "shards_written_total",
			Help: "Shard files written by this process."}),
		bytes: prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "cache", Name: "bytes_written_total",
			Help: "Bytes of shard files written by this process."}),
		tokens: prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "cache", Name: "tokens_written_total",
			Help: "Tokens in the shard files written by this process."}),
		redeliveries: prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "cache", Name: "redeliveries_total",
			Help: "Records received again after an earlier delivery was not acked."}),
		onDisk: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: Namespace, Subsystem: "cache", Name: "shards",
			Help: "Shards listed in the cache's manifest."}),
	}
	r.reg.MustRegister(c.shards, c.bytes, c.tokens, c.redeliveries, c.onDisk)
	r.cache = c
	return c
}

// ShardWritten counts a shard file written; manifest is the number of shards the manifest
// now lists.
func (c *CacheWriter) ShardWritten(bytes int64, tokens int, manifest int) {
	if c == nil {
		return
	}
	c.shards.Inc()
	c.bytes.Add(float64(bytes))
	c.tokens.Add(float64(tokens))
	c.onDisk.Set(float64(manifest))
}

// SetShards records the number of shards the manifest lists (after loading it).
func (c *CacheWriter) SetShards(manifest int) {
	if c == nil {
		return
	}
	c.onDisk.Set(float64(manifest))
}

// Redelivered counts a record delivered more than once.
func (c *CacheWriter) Redelivered() {
	if c == nil {
		return
	}
	c.redeliveries.Inc()
}

// Student is a student's training.
type Student struct {
	step, total, loss, valid, rate, lr, eta prometheus.Gauge
	steps                                   prometheus.Counter
}

// Student returns the registry's student metrics (registering them once).
func (r *Registry) Student() *Student {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.student != nil {
		return r.student
	}
	g := func(name, help string) prometheus.Gauge {
		return prometheus.NewGauge(prometheus.GaugeOpts{Namespace: Namespace, Subsystem: "student", Name: name, Help: help})
	}
	s := &Student{
		step:  g("step", "Optimizer steps done (resumed steps included)."),
		total: g("steps_planned", "Optimizer steps the training will take."),
		loss:  g("loss", "The last step's mean training loss."),
		valid: g("valid_loss", "The latest validation loss (NaN before any)."),
		rate:  g("tokens_per_second", "Training tokens per second in this session."),
		lr:    g("learning_rate", "The last step's learning rate."),
		eta:   g("eta_seconds", "Estimated seconds to the end of the training."),
		steps: prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "student", Name: "steps_total",
			Help: "Optimizer steps this process took."}),
	}
	r.reg.MustRegister(s.step, s.total, s.loss, s.valid, s.rate, s.lr, s.eta, s.steps)
	r.student = s
	return s
}

// StepInfo is what a student reports after a step.
type StepInfo struct {
	Step, TotalSteps    int
	Loss, ValidLoss, LR float64
	TokensPerSec        float64
	ETA                 time.Duration
}

// Step records a step.
func (s *Student) Step(i StepInfo) {
	if s == nil {
		return
	}
	s.steps.Inc()
	s.step.Set(float64(i.Step))
	s.total.Set(float64(i.TotalSteps))
	s.loss.Set(i.Loss)
	s.valid.Set(i.ValidLoss)
	s.rate.Set(i.TokensPerSec)
	s.lr.Set(i.LR)
	s.eta.Set(i.ETA.Seconds())
}

// Parse reads a scrape in the Prometheus text format and returns every sample's value keyed
// by its name and labels as the format writes them, labels sorted by name:
// `linearpatch_run_shards{phase="cache",state="done"}`, or the bare name without labels.
func Parse(text string) (map[string]float64, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	out := map[string]float64{}
	for name, f := range fams {
		for _, m := range f.GetMetric() {
			labels := m.GetLabel()
			sort.Slice(labels, func(i, j int) bool { return labels[i].GetName() < labels[j].GetName() })
			key := name
			if len(labels) > 0 {
				parts := make([]string, len(labels))
				for i, l := range labels {
					parts[i] = fmt.Sprintf("%s=%q", l.GetName(), l.GetValue())
				}
				key += "{" + strings.Join(parts, ",") + "}"
			}
			switch {
			case m.Gauge != nil:
				out[key] = m.GetGauge().GetValue()
			case m.Counter != nil:
				out[key] = m.GetCounter().GetValue()
			case m.Untyped != nil:
				out[key] = m.GetUntyped().GetValue()
			}
		}
	}
	return out, nil
}
