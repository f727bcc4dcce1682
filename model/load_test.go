package model

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// hostileLayerDir copies the shared tinystories-8L model into a temporary directory with
// config.json's num_hidden_layers replaced by layers (written as a JSON integer literal).
func hostileLayerDir(t *testing.T, layers string) string {
	t.Helper()
	src := sharedPath(t, "models/tinystories-8L")
	raw, err := os.ReadFile(filepath.Join(src, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]json.RawMessage
	if err := json.Unmarshal(raw, &cfg); err != nil {
		t.Fatal(err)
	}
	cfg["num_hidden_layers"] = json.RawMessage(layers)
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	abs, err := filepath.Abs(filepath.Join(src, "model.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(abs, filepath.Join(dir, "model.safetensors")); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestLoadLayerCountBeyondTensors: a config.json claiming more layers than the weights hold
// is refused before the layers are sized by it, quickly and without a panic (2e18 used to
// panic in makeslice, 1e9 to allocate gigabytes and visit every layer after the first error).
func TestLoadLayerCountBeyondTensors(t *testing.T) {
	for _, layers := range []string{"9", "1000000000", "2000000000000000000"} {
		t.Run(layers, func(t *testing.T) {
			dir := hostileLayerDir(t, layers)
			start := time.Now()
			_, err := Load(dir)
			if !errors.Is(err, ErrWeights) {
				t.Fatalf("Load: %v, want ErrWeights", err)
			}
			if !strings.Contains(err.Error(), "num_hidden_layers "+layers) {
				t.Errorf("error %q does not name the layer count from config.json", err)
			}
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("Load took %v to refuse the config", d)
			}
			if _, err := ReadModelConfig(dir); !errors.Is(err, ErrWeights) {
				t.Errorf("ReadModelConfig: %v, want ErrWeights (callers size plans by the layer count)", err)
			}
		})
	}
}

// cancelSource cancels its context after n tensor reads and counts the reads.
type cancelSource struct {
	TensorSource
	n, reads int
	cancel   context.CancelFunc
}

func (c *cancelSource) ReadTensor(name string) ([]float32, []int, error) {
	c.reads++
	if c.reads == c.n {
		c.cancel()
	}
	return c.TensorSource.ReadTensor(name)
}

// TestLoadContextStopsBetweenTensors: a cancelled load reads no tensor after the
// cancellation and returns the context's error.
func TestLoadContextStopsBetweenTensors(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	_, err := LoadContext(ctx, sharedPath(t, "models/tinystories-8L"))
	if err != nil {
		t.Fatalf("LoadContext with a live context: %v", err)
	}
	cancel()
	if _, err := LoadContext(ctx, sharedPath(t, "models/tinystories-8L")); !errors.Is(err, context.Canceled) {
		t.Fatalf("LoadContext with a cancelled context: %v, want context.Canceled", err)
	}

	src, err := OpenSafetensorsDir(sharedPath(t, "models/tinystories-8L"))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	cfg, err := ReadConfig(filepath.Join(sharedPath(t, "models/tinystories-8L"), "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel = context.WithCancel(context.Background())
	defer cancel()
	cs := &cancelSource{TensorSource: src, n: 3, cancel: cancel}
	if _, err := build(ctx, cfg, cs, loadOptions{to: -1}); !errors.Is(err, context.Canceled) {
		t.Fatalf("build cancelled after 3 tensors: %v, want context.Canceled", err)
	}
	if cs.reads != 3 {
		t.Errorf("build read %d tensors, want 3 (none after the cancellation)", cs.reads)
	}
}

// TestReadTokensContextStops: tokenization checks the context between lines (every 1024:
// train.txt has more).
func TestReadTokensContextStops(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	tok, err := LoadTokenizer(sharedPath(t, "models/tinystories-8L"), 1024)
	if err != nil {
		t.Fatal(err)
	}
	_, err = ReadTokens(ctx, sharedPath(t, "data/tinystories/train.txt"), tok, 1024, DataOptions{})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("ReadTokens with a cancelled context: %v, want context.Canceled", err)
	}
}
