package student

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func sampleCheckpoint() *Checkpoint {
	return &Checkpoint{
		Step: 7, Epoch: 1, Cursor: 2, AdamStep: 7,
		P: []float32{1, -0.5, float32(math.Copysign(0, -1)), 3.25}, M: []float64{1e-300, -2, 3, 4}, V: []float64{0, 1, 2, math.SmallestNonzeroFloat64},
		Fingerprint: "abc", Identity: Fingerprint{Config: TrainConfig{LR: 1e-4, Seed: 3}, Train: []ShardSpec{{0, 3}}, P0: "p0", Extra: map[string]string{"k": "v"}},
		TrainLoss: []CurvePoint{{1, 0.5}, {2, math.NaN()}, {3, 0.25}},
		ValidLoss: []CurvePoint{{0, math.Inf(1)}},
		BestValid: math.Inf(1), BestStep: 0,
		ShardSHA256: map[int]string{0: "aa", 6: "bb"},
		Elapsed:     3 * time.Second, Done: true,
	}
}

func sameCheckpoint(a, b *Checkpoint) bool {
	if !sameCurve(a.TrainLoss, b.TrainLoss) || !sameCurve(a.ValidLoss, b.ValidLoss) ||
		math.Float64bits(a.BestValid) != math.Float64bits(b.BestValid) {
		return false
	}
	x, y := *a, *b
	if !reflect.DeepEqual(bits32(x.P), bits32(y.P)) {
		return false
	}
	x.TrainLoss, y.TrainLoss, x.ValidLoss, y.ValidLoss, x.BestValid, y.BestValid = nil, nil, nil, nil, 0, 0
	x.P, y.P = nil, nil
	return reflect.DeepEqual(x, y)
}

// TestCheckpointRoundTrip: every field survives, bit for bit (NaN and ±Inf losses, −0, nil
// and non-nil best P).
func TestCheckpointRoundTrip(t *testing.T) {
	ctx := context.Background()
	for _, withBest := range []bool{false, true} {
		c := sampleCheckpoint()
		if withBest {
			c.BestP, c.BestValid, c.BestStep = []float32{1, 2, 3, 4}, 0.125, 5
		}
		s := NewFileCheckpointStore(filepath.Join(t.TempDir(), "ck"))
		if _, err := s.Load(ctx); !errors.Is(err, ErrNoCheckpoint) {
			t.Fatalf("empty store: %v, want ErrNoCheckpoint", err)
		}
		if err := s.Save(ctx, c); err != nil {
			t.Fatal(err)
		}
		got, err := s.Load(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if !sameCheckpoint(got, c) {
			t.Fatalf("round trip:\n got %+v\nwant %+v", got, c)
		}
		if cl := c.clone(); !sameCheckpoint(cl, c) {
			t.Fatal("clone differs")
		}
	}
}

type failingWriter struct {
	w    io.Writer
	left int
}

func (f *failingWriter) Write(p []byte) (int, error) {
	if len(p) > f.left {
		n, _ := f.w.Write(p[:f.left])
		f.left = 0
		return n, errors.New("disk full")
	}
	f.left -= len(p)
	return f.w.Write(p)
}

// TestCheckpointAtomic: a save that fails midway leaves the previous checkpoint, whole; a
// temporary file left by a killed process is ignored, then cleaned up; damaged files are
// ErrCheckpointCorrupt, never a fresh start.
func TestCheckpointAtomic(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := NewFileCheckpointStore(dir)
	first := sampleCheckpoint()
	if err := s.Save(ctx, first); err != nil {
		t.Fatal(err)
	}
	second := sampleCheckpoint()
	second.Step, second.P[0] = 8, 42
	for _, cut := range []int{0, 10, 200} {
		s.wrap = func(w io.Writer) io.Writer { return &failingWriter{w: w, left: cut} }
		if err := s.Save(ctx, second); err == nil || !strings.Contains(err.Error(), "disk full") {
			t.Fatalf("failing save after %d bytes: %v", cut, err)
		}
		got, err := s.Load(ctx)
		if err != nil || !sameCheckpoint(got, first) {
			t.Fatalf("after a failed save: %v, %+v", err, got)
		}
	}
	s.wrap = nil
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Fatalf("failed saves left files: %v", ents)
	}

	// A killed process's temporary file.
	stale := filepath.Join(dir, "."+CheckpointFile+".tmp-123")
	os.WriteFile(stale, []byte("LPCKPT02 half"), 0o644)
	if got, err := s.Load(ctx); err != nil || got.Step != first.Step {
		t.Fatalf("with a stale temporary file: %v", err)
	}
	if err := s.Save(ctx, second); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stale); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("the stale temporary file survived a save")
	}
	if got, err := s.Load(ctx); err != nil || got.Step != 8 || got.P[0] != 42 {
		t.Fatalf("second checkpoint: %v", err)
	}

	// Damage.
	good, _ := os.ReadFile(s.Path())
	for name, b := range map[string][]byte{
		"truncated": good[:len(good)-5],
		"flipped":   flip(good, len(good)/2),
		"empty":     nil,
		"magic":     append([]byte("LPCKPT99"), good[8:]...),
	} {
		os.WriteFile(s.Path(), b, 0o644)
		if _, err := s.Load(ctx); !errors.Is(err, ErrCheckpointCorrupt) {
			t.Fatalf("%s: %v, want ErrCheckpointCorrupt", name, err)
		}
	}
}

// TestCheckpointOldVersion: a checkpoint of format 01 (steps that ran a batch through one
// graph) is refused by name, not taken for a damaged file, and a resume says to start over.
func TestCheckpointOldVersion(t *testing.T) {
	ctx := context.Background()
	s := NewFileCheckpointStore(t.TempDir())
	if err := s.Save(ctx, sampleCheckpoint()); err != nil {
		t.Fatal(err)
	}
	good, _ := os.ReadFile(s.Path())
	if string(good[:8]) != "LPCKPT02" {
		t.Fatalf("magic %q", good[:8])
	}
	old := append([]byte("LPCKPT01"), good[8:]...)
	os.WriteFile(s.Path(), old, 0o644)
	_, err := s.Load(ctx)
	if !errors.Is(err, ErrCheckpointVersion) || errors.Is(err, ErrCheckpointCorrupt) || !strings.Contains(err.Error(), "start over without resume") {
		t.Fatalf("format 01: %v, want ErrCheckpointVersion asking to start over", err)
	}
	t.Log(err)
}

func flip(b []byte, i int) []byte {
	c := bytes.Clone(b)
	c[i] ^= 1
	return c
}

// FuzzDecodeCheckpoint: the decoder never panics, and what it accepts re-encodes to the
// same bytes.
func FuzzDecodeCheckpoint(f *testing.F) {
	var buf bytes.Buffer
	if err := encodeCheckpoint(&buf, sampleCheckpoint()); err != nil {
		f.Fatal(err)
	}
	f.Add(buf.Bytes())
	f.Add([]byte("LPCKPT01"))
	f.Add([]byte("LPCKPT02"))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := decodeCheckpoint(b)
		if err != nil {
			if !errors.Is(err, ErrCheckpointCorrupt) && !errors.Is(err, ErrCheckpointVersion) {
				t.Fatalf("error %v wraps neither ErrCheckpointCorrupt nor ErrCheckpointVersion", err)
			}
			return
		}
		var out bytes.Buffer
		if err := encodeCheckpoint(&out, c); err != nil {
			t.Fatal(err)
		}
		if _, err := decodeCheckpoint(out.Bytes()); err != nil {
			t.Fatalf("re-encoded checkpoint does not decode: %v", err)
		}
	})
}
