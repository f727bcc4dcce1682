package cache

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// WriterKey is the key of the cache writer's lease in the run's key-value bucket.
//
// A run has exactly one cache writer: two would split the durable consumer's messages
// between them, each holding half of every shard. The writer holds the lease by renewing
// the key; a second writer is refused while the holder renews it, and takes over when the
// holder stops renewing (it died) or, at once, when it is the same writer restarted (same
// host and directory).
const WriterKey = "writer.cache"

// DefaultLeaseRenewal is how often a writer renews its lease; a lease not renewed for three
// periods is taken over.
const DefaultLeaseRenewal = 5 * time.Second

// ErrWriterBusy is returned when another cache writer holds the run's lease and renews it.
var ErrWriterBusy = errors.New("cache: another cache writer is writing this run")

// ErrLeaseLost is returned when another writer took the lease over (this one stopped
// renewing it for too long, e.g. across a long network partition).
var ErrLeaseLost = errors.New("cache: another cache writer took this run over")

// Holder identifies the writer holding the lease.
type Holder struct {
	Host string `json:"host"`
	PID  int    `json:"pid"`
	Dir  string `json:"dir"` // the cache directory, absolute
	// Renewal is how often the holder renews the lease: a contender waits three of them.
	Renewal time.Duration `json:"renewal"`
}

func (h Holder) String() string { return fmt.Sprintf("%s (pid %d) writing %s", h.Host, h.PID, h.Dir) }

// thisWriter is the Holder of this process writing dir, renewing every renewal.
func thisWriter(dir string, renewal time.Duration) Holder {
	host, _ := os.Hostname()
	if abs, err := filepath.Abs(dir); err == nil {
		dir = abs
	}
	return Holder{Host: host, PID: os.Getpid(), Dir: dir, Renewal: renewal}
}

// lease is a held writer lease.
type lease struct {
	kv    jetstream.KeyValue
	value []byte // the holder, as stored
	rev   uint64
	every time.Duration
	log   *slog.Logger
}

// acquireLease takes the run's writer lease for h, to be renewed every h.Renewal. It waits
// up to three of the current holder's renewal periods to learn whether that holder is alive,
// and returns ErrWriterBusy (naming the holder) if it is.
func acquireLease(ctx context.Context, kv jetstream.KeyValue, h Holder, log *slog.Logger) (*lease, error) {
	if h.Renewal <= 0 {
		return nil, fmt.Errorf("cache: lease renewal period %v", h.Renewal)
	}
	value, err := json.Marshal(h)
	if err != nil {
		return nil, err
	}
	l := &lease{kv: kv, value: value, every: h.Renewal, log: log}
	for {
		rev, err := kv.Create(ctx, WriterKey, value)
		if err == nil {
			l.rev = rev
			return l, nil
		}
		if !errors.Is(err, jetstream.ErrKeyExists) {
			return nil, fmt.Errorf("cache: take the writer lease: %w", err)
		}
		e, err := kv.Get(ctx, WriterKey)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue // released in between
		}
		if err != nil {
			return nil, fmt.Errorf("cache: read the writer lease: %w", err)
		}
		var cur Holder
		_ = json.Unmarshal(e.Value(), &cur) // an unreadable holder is treated like a silent one
		if cur.Host == h.Host && cur.Dir == h.Dir {
			log.Info("taking the writer lease over from an earlier process of this writer", "pid", cur.PID)
		} else {
			wait := 3 * max(cur.Renewal, h.Renewal)
			log.Info("another cache writer holds the lease; waiting to see whether it is alive", "holder", cur.String(),
				"wait", wait)
			renewed, gone, err := l.watch(ctx, e.Revision(), wait)
			switch {
			case err != nil:
				return nil, err
			case gone:
				continue
			case renewed:
				return nil, fmt.Errorf("%w: %s; a run has one cache writer (stop that one first)", ErrWriterBusy, cur)
			}
			log.Warn("the cache writer holding the lease stopped renewing it; taking over", "holder", cur.String())
		}
		rev, err = kv.Update(ctx, WriterKey, value, e.Revision())
		if err == nil {
			l.rev = rev
			return l, nil
		}
		if !errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			return nil, fmt.Errorf("cache: take the writer lease: %w", err)
		}
		// another writer moved first: look again
	}
}

// watch polls the lease for up to d: renewed when its revision moved on, gone when it was
// released.
func (l *lease) watch(ctx context.Context, rev uint64, d time.Duration) (renewed, gone bool, err error) {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return false, false, ctx.Err()
		case <-time.After(min(l.every, d) / 4):
		}
		e, err := l.kv.Get(ctx, WriterKey)
		switch {
		case errors.Is(err, jetstream.ErrKeyNotFound):
			return false, true, nil
		case err != nil:
			continue // the server may be restarting: keep watching until the deadline
		case e.Revision() != rev:
			return true, false, nil
		}
	}
	return false, false, nil
}

// keep renews the lease every period until ctx ends (nil) or another writer took it over
// (ErrLeaseLost). Failed renewals (a server restart) are retried at the next period.
func (l *lease) keep(ctx context.Context) error {
	t := time.NewTicker(l.every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		rctx, cancel := context.WithTimeout(ctx, l.every)
		rev, err := l.kv.Update(rctx, WriterKey, l.value, l.rev)
		cancel()
		switch {
		case err == nil:
			l.rev = rev
		case errors.Is(err, jetstream.ErrKeyRevisionMismatch):
			// A renewal whose reply was lost may have been stored: then the key still
			// holds this writer, one revision on.
			e, gerr := l.kv.Get(ctx, WriterKey)
			if gerr == nil && string(e.Value()) == string(l.value) {
				l.rev = e.Revision()
				continue
			}
			if gerr != nil && !errors.Is(gerr, jetstream.ErrKeyNotFound) {
				l.log.Warn("renewing the writer lease failed; retrying", "err", gerr)
				continue
			}
			return ErrLeaseLost
		case ctx.Err() != nil:
			return nil
		default:
			l.log.Warn("renewing the writer lease failed; retrying", "err", err)
		}
	}
}

// release gives the lease up so that a successor need not wait.
func (l *lease) release() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = l.kv.Delete(ctx, WriterKey, jetstream.LastRevision(l.rev))
}

// CurrentWriter returns the holder of the run's writer lease, or nil when no writer holds it.
func CurrentWriter(ctx context.Context, kv jetstream.KeyValue) (*Holder, error) {
	e, err := kv.Get(ctx, WriterKey)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("cache: read the writer lease: %w", err)
	}
	var h Holder
	if err := json.Unmarshal(e.Value(), &h); err != nil {
		return nil, fmt.Errorf("cache: read the writer lease: %w", err)
	}
	return &h, nil
}
