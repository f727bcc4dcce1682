package cache

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

const testRenewal = 250 * time.Millisecond

func (h *harness) kv() jetstream.KeyValue {
	h.t.Helper()
	kv, err := h.js.KeyValue(context.Background(), h.names.KVBucket())
	if err != nil {
		h.t.Fatal(err)
	}
	return kv
}

func TestLeaseSecondWriterRefused(t *testing.T) {
	h := newHarness(t)
	kv := h.kv()
	a, err := acquireLease(t.Context(), kv, Holder{Host: "a", PID: 1, Dir: "/cache", Renewal: testRenewal}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	kept := make(chan error, 1)
	go func() { kept <- a.keep(ctx) }()
	_, err = acquireLease(t.Context(), kv, Holder{Host: "b", PID: 2, Dir: "/cache", Renewal: testRenewal}, slog.New(slog.DiscardHandler))
	if !errors.Is(err, ErrWriterBusy) || !strings.Contains(err.Error(), "a (pid 1)") {
		t.Fatalf("second writer: %v, want ErrWriterBusy naming the holder", err)
	}
	cancel()
	if err := <-kept; err != nil {
		t.Fatalf("keep: %v", err)
	}
	a.release()
	log := &lockedBuffer{}
	if _, err := acquireLease(t.Context(), kv, Holder{Host: "b", PID: 2, Dir: "/cache", Renewal: testRenewal}, slog.New(slog.NewTextHandler(log, nil))); err != nil {
		t.Fatalf("after release: %v", err)
	}
	if strings.Contains(log.String(), "waiting") {
		t.Errorf("a released lease was waited for:\n%s", log)
	}
}

func TestLeaseTakeover(t *testing.T) {
	h := newHarness(t)
	kv := h.kv()
	log := &lockedBuffer{}
	logger := slog.New(slog.NewTextHandler(log, nil))
	// a dead holder: it took the lease and never renews it
	if _, err := acquireLease(t.Context(), kv, Holder{Host: "a", PID: 1, Dir: "/cache", Renewal: testRenewal}, logger); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	b, err := acquireLease(t.Context(), kv, Holder{Host: "b", PID: 2, Dir: "/other", Renewal: testRenewal}, logger)
	if err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el < 3*testRenewal {
		t.Errorf("took over after %v, before three renewal periods", el)
	}
	if !strings.Contains(log.String(), "stopped renewing") {
		t.Errorf("the takeover was not logged:\n%s", log)
	}
	// the same writer restarted (same host and directory) takes over at once
	log.Reset()
	if _, err := acquireLease(t.Context(), kv, Holder{Host: "b", PID: 3, Dir: "/other", Renewal: testRenewal}, logger); err != nil {
		t.Fatal(err)
	}
	if got := log.String(); strings.Contains(got, "waiting") || !strings.Contains(got, "earlier process of this writer") {
		t.Errorf("a restarted writer did not take over at once:\n%s", got)
	}
	// and the process it replaced learns that at its next renewal
	if err := b.keep(t.Context()); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("the replaced writer's keep: %v, want ErrLeaseLost", err)
	}
}

// TestLeaseRenewalReplyLost: a renewal stored by the server whose reply never arrived is not
// mistaken for a takeover.
func TestLeaseRenewalReplyLost(t *testing.T) {
	h := newHarness(t)
	kv := h.kv()
	a, err := acquireLease(t.Context(), kv, Holder{Host: "a", PID: 1, Dir: "/cache", Renewal: testRenewal}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	lost, err := kv.Update(t.Context(), WriterKey, a.value, a.rev) // the "lost" renewal
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*testRenewal)
	defer cancel()
	if err := a.keep(ctx); err != nil {
		t.Fatalf("keep: %v", err)
	}
	e, err := kv.Get(t.Context(), WriterKey)
	if err != nil {
		t.Fatal(err)
	}
	// (the last renewal may be stored with its reply cut off by the deadline: compare with
	// the lost revision, not with the writer's)
	var cur Holder
	if err := json.Unmarshal(e.Value(), &cur); err != nil || cur.Host != "a" || e.Revision() <= lost {
		t.Fatalf("lease now %s at revision %d (lost renewal at %d), err %v", e.Value(), e.Revision(), lost, err)
	}
}

// TestWriterRefusesSecondWriter: a second cache writer on the same run stops with
// ErrWriterBusy and leaves its directory alone.
func TestWriterRefusesSecondWriter(t *testing.T) {
	h := newHarness(t)
	h.startWriter()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := h.kv().Get(t.Context(), WriterKey); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the first writer never took the lease")
		}
		time.Sleep(20 * time.Millisecond)
	}
	dir := filepath.Join(t.TempDir(), "second")
	w, err := NewWriter(Options{JS: h.js, Names: h.names, Dir: dir, Dim: testDim, Vocab: testVocab, LeaseRenewal: testRenewal})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := w.Run(ctx); !errors.Is(err, ErrWriterBusy) {
		t.Fatalf("second writer: %v, want ErrWriterBusy", err)
	}
	if matches, _ := filepath.Glob(filepath.Join(dir, "*")); len(matches) > 0 {
		t.Fatalf("the refused writer wrote %v", matches)
	}
}
