package main

import (
	"context"

	"linearpatch/coordinator"
	"linearpatch/protocol"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

// progress reports a long task: a progress bar when stderr is a terminal, a log line every
// few seconds otherwise. It is safe for concurrent use.
type progress struct {
	mu      sync.Mutex
	bar     *progressbar.ProgressBar
	desc    string
	unit    string
	total   int
	done    int
	start   time.Time
	lastLog time.Time
}

func newProgress(desc, unit string, total int) *progress {
	p := &progress{desc: desc, unit: unit, total: total, start: time.Now()}
	p.lastLog = p.start
	if term.IsTerminal(int(os.Stderr.Fd())) {
		p.bar = progressbar.NewOptions(total,
			progressbar.OptionSetWriter(os.Stderr),
			progressbar.OptionSetDescription(desc),
			progressbar.OptionShowCount(),
			progressbar.OptionShowIts(),
			progressbar.OptionSetItsString(unit),
			progressbar.OptionSetPredictTime(true),
			progressbar.OptionClearOnFinish(),
			progressbar.OptionThrottle(100*time.Millisecond),
		)
	}
	return p
}

// Set records that n units of the total are done.
func (p *progress) Set(n int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done = n
	if p.bar != nil {
		_ = p.bar.Set(n)
		return
	}
	if now := time.Now(); now.Sub(p.lastLog) >= 5*time.Second {
		p.lastLog = now
		slog.Info(p.desc, "done", n, "total", p.total, "unit", p.unit, "elapsed", now.Sub(p.start).Round(time.Second))
	}
}

// Finish closes the bar and logs the total time.
func (p *progress) Finish() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.bar != nil {
		_ = p.bar.Finish()
	}
	slog.Info(p.desc+" done", p.unit, p.done, "elapsed", time.Since(p.start).Round(time.Millisecond))
}

// phaseBars shows a progress bar per phase of a run, polling the coordinator's status.
type phaseBars struct {
	coord *coordinator.Coordinator
	plan  *protocol.Plan
	bars  map[protocol.Phase]*progress
	ended map[protocol.Phase]bool
}

func newPhaseBars(c *coordinator.Coordinator, p *protocol.Plan) *phaseBars {
	return &phaseBars{coord: c, plan: p, bars: map[protocol.Phase]*progress{}, ended: map[protocol.Phase]bool{}}
}

func (b *phaseBars) run(ctx context.Context) {
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			b.update()
		}
	}
}

func (b *phaseBars) update() {
	st := b.coord.Status()
	for _, ph := range []protocol.Phase{protocol.PhaseStats, protocol.PhaseCache} {
		total := len(b.plan.Shards(ph))
		if total == 0 || st.Done == nil || b.ended[ph] {
			continue
		}
		if ph == protocol.PhaseCache && st.Phase == protocol.PhaseStats {
			continue
		}
		bar := b.bars[ph]
		if bar == nil {
			bar = newProgress(string(ph)+" phase", "shards", total)
			b.bars[ph] = bar
		}
		bar.Set(st.Done[ph])
		if st.Done[ph] == total {
			bar.Finish()
			b.ended[ph] = true
		}
	}
}

func (b *phaseBars) finish() {
	b.update()
	for ph, bar := range b.bars {
		if !b.ended[ph] {
			bar.Finish()
		}
	}
}
