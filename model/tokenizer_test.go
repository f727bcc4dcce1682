package model

import (
	"cmp"
	"errors"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestLoadTokenizer(t *testing.T) {
	shared := tokShared(t)
	tinyDir := filepath.Join(shared, "models", "tinystories-8L")
	for _, path := range []string{tinyDir, filepath.Join(tinyDir, "model.safetensors")} {
		tok, err := LoadTokenizer(path, 1024)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := tok.(*SentencePiece); !ok || tok.VocabSize() != 1024 {
			t.Fatalf("%s: got %T with %d pieces", path, tok, tok.VocabSize())
		}
	}
	if _, err := LoadTokenizer(tinyDir, 512); !errors.Is(err, ErrTokenizer) {
		t.Errorf("tokenizer larger than the model: err = %v", err)
	}
	_, err := LoadTokenizer(filepath.Join(shared, "models", "stories260K", "stories260K.bin"), 512)
	if !errors.Is(err, ErrNoTokenizer) || !strings.Contains(err.Error(), "stories260K.bin") {
		t.Errorf("stories260K: err = %v, want ErrNoTokenizer naming the model", err)
	}
	if _, err := LoadTokenizer(filepath.Join(t.TempDir(), "none"), 0); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing model: err = %v", err)
	}

	// A llama2.c checkpoint with tokenizer.bin beside it.
	dir := t.TempDir()
	pieces, scores := smallLlama2cVocab(" ", float32(-1), "a", float32(-1))
	writeLlama2cTok(t, dir, pieces, scores)
	bin := filepath.Join(dir, "model.bin")
	if err := os.WriteFile(bin, []byte("weights"), 0o644); err != nil {
		t.Fatal(err)
	}
	tok, err := LoadTokenizer(bin, len(pieces))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := tok.(*Llama2cTokenizer); !ok || tok.VocabSize() != len(pieces) {
		t.Fatalf("got %T with %d pieces", tok, tok.VocabSize())
	}
	if _, err := LoadTokenizer(bin, 0); !errors.Is(err, ErrTokenizer) {
		t.Errorf("llama2.c tokenizer without vocab size: err = %v", err)
	}
	if _, err := LoadTokenizer(dir, 0); !errors.Is(err, ErrNoTokenizer) {
		t.Errorf("directory without tokenizer.model: err = %v", err)
	}
}

// TestTokenizerBPEHeap checks the candidate queue against its naive twin, a linear scan
// for the best queued pair (highest score, ties leftmost), over random heapified starts
// and interleaved pushes and pops.
func TestTokenizerBPEHeap(t *testing.T) {
	better := func(a, b bpePair) int { // < 0: a pops first
		if c := cmp.Compare(b.score, a.score); c != 0 {
			return c
		}
		return cmp.Compare(a.left, b.left)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for trial := range 300 {
		n := rng.IntN(40)
		var h bpeHeap
		var queued []bpePair
		next := int32(0)
		pair := func() bpePair {
			next++
			return bpePair{score: float32(rng.IntN(5)), left: next}
		}
		for range n {
			p := pair()
			h = append(h, p)
			queued = append(queued, p)
		}
		for i := len(h)/2 - 1; i >= 0; i-- {
			h.down(i)
		}
		for len(queued) > 0 {
			if rng.IntN(3) == 0 {
				p := pair()
				h.push(p)
				queued = append(queued, p)
				continue
			}
			best := 0
			for i := range queued {
				if better(queued[i], queued[best]) < 0 {
					best = i
				}
			}
			if got := h.pop(); got != queued[best] {
				t.Fatalf("trial %d: popped %+v, want %+v", trial, got, queued[best])
			}
			queued = slices.Delete(queued, best, best+1)
			if len(h) != len(queued) {
				t.Fatalf("trial %d: heap holds %d, want %d", trial, len(h), len(queued))
			}
		}
	}
}
