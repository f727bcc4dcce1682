package model

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestSentencePieceChunkedMatchesWhole: encoding a long text in chunks cut where no piece
// joins the two characters gives the ids of the one-piece segmentation, for chunk sizes
// down to one byte; Encode takes the chunked path on valid.txt taken whole.
func TestSentencePieceChunkedMatchesWhole(t *testing.T) {
	sp := tinyTokenizer(t)
	rng := rand.New(rand.NewPCG(3, 4))
	var texts []string
	for range 20 {
		var b strings.Builder
		for range 200 {
			b.WriteString(randomText(rng))
		}
		texts = append(texts, b.String())
	}
	b, err := os.ReadFile(filepath.Join(tokShared(t), "data", "tinystories", "valid.txt"))
	if err != nil {
		t.Fatal(err)
	}
	whole := string(b)
	texts = append(texts, whole[:20000], strings.Repeat("\x00", 5000), strings.Repeat("a", 3000))
	for i, x := range texts {
		norm := sp.normalize(x)
		want := sp.encodeNormalized(norm)
		for _, chunk := range []int{1, 3, 50, 4096} {
			if got := sp.encodeChunked(norm, chunk); !slices.Equal(got, want) {
				t.Fatalf("text %d, chunks of %d: %d ids, whole %d (first difference at %d)", i, chunk, len(got), len(want), firstDiff(got, want))
			}
		}
	}
	if len(sp.normalize(whole)) <= spChunkBytes {
		t.Fatal("valid.txt does not take the chunked path")
	}
	if got, want := sp.Encode(whole), sp.encodeNormalized(sp.normalize(whole)); !slices.Equal(got, want) {
		t.Fatalf("valid.txt: Encode gives %d ids, the one-piece segmentation %d", len(got), len(want))
	}
}

func firstDiff(a, b []int) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
