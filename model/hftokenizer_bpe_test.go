package model

import (
	"encoding/json"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"testing"
)

// naiveRankBPE is the twin of mergeWord: repeatedly merge the adjacent pair of lowest rank
// (leftmost on ties), rescanning the whole word each time.
func naiveRankBPE(t *HFTokenizer, syms []int) []int {
	syms = slices.Clone(syms)
	for {
		best, bestRank := -1, int32(0)
		var bestID int32
		for i := 0; i+1 < len(syms); i++ {
			m, ok := t.merges[mergeKey(syms[i], syms[i+1])]
			if ok && (best < 0 || m.rank < bestRank) {
				best, bestRank, bestID = i, m.rank, m.id
			}
		}
		if best < 0 {
			return syms
		}
		syms[best] = int(bestID)
		syms = slices.Delete(syms, best+1, best+2)
	}
}

// TestHFBPEMatchesNaive checks the heap merge against its naive twin on random vocabularies
// and words over a small alphabet (many ties and competing merges), words of length 0..40.
func TestHFBPEMatchesNaive(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	alphabet := []string{"a", "b", "c", "d"}
	for trial := 0; trial < 200; trial++ {
		vocab := map[string]int{}
		pieces := []string{}
		for _, c := range alphabet {
			vocab[c] = len(pieces)
			pieces = append(pieces, c)
		}
		var merges [][2]string
		seen := map[[2]string]bool{}
		for k := 0; k < 1+rng.IntN(30); k++ {
			p := [2]string{pieces[rng.IntN(len(pieces))], pieces[rng.IntN(len(pieces))]}
			if seen[p] || len(p[0]+p[1]) > 8 {
				continue
			}
			seen[p] = true
			merges = append(merges, p)
			if _, ok := vocab[p[0]+p[1]]; !ok {
				vocab[p[0]+p[1]] = len(pieces)
				pieces = append(pieces, p[0]+p[1])
			}
		}
		b, err := json.Marshal(map[string]any{"model": map[string]any{"type": "BPE", "vocab": vocab, "merges": merges},
			"post_processor": nil})
		if err != nil {
			t.Fatal(err)
		}
		tok, err := ParseHFTokenizer(b, nil, []byte(`{"bos_token_id": 0}`))
		if err != nil {
			t.Fatal(err)
		}
		for w := 0; w < 20; w++ {
			word := ""
			var chars []int
			for range rng.IntN(41) {
				c := rng.IntN(len(alphabet))
				word += alphabet[c]
				chars = append(chars, c)
			}
			in := word
			var sc hfScratch
			got := tok.mergeWord(nil, word, &sc)
			want := naiveRankBPE(tok, chars)
			if len(want) == 0 {
				want = nil
			}
			if !slices.Equal(got, want) || word != in {
				t.Fatalf("trial %d: word %q merges %v:\n got %v\nwant %v", trial, word, merges, got, want)
			}
			if enc := tok.Encode(word); !slices.Equal(enc, want) { // through the cache too
				t.Fatalf("Encode(%q) = %v, want %v", word, enc, want)
			}
			chunked := *tok
			chunked.chunkBytes = 1 + rng.IntN(6)
			if got := chunked.mergeChunks(nil, word, &sc); !slices.Equal(got, want) {
				t.Fatalf("chunks of %d bytes: %q = %v, want %v (merges %v)", chunked.chunkBytes, word, got, want, merges)
			}
		}
	}
}

// TestHFChunkedEncode: Mistral's tokenizer (no pre-tokenizer: a line is one word) encodes
// long lines in chunks; cut every few bytes, the golden lines and TinyStories prose still
// get the ids of the whole-word merge.
func TestHFChunkedEncode(t *testing.T) {
	tok := loadSharedHF(t, "mistral")
	if tok.cross == nil {
		t.Fatal("Mistral's merges should allow chunking")
	}
	var texts []string
	for _, g := range readHFGolden(t, "mistral") {
		texts = append(texts, g.Text)
	}
	prose, err := os.ReadFile(sharedPath(t, "data/tinystories/valid.txt"))
	if err != nil {
		t.Fatal(err)
	}
	texts = append(texts, strings.Split(string(prose[:min(len(prose), 100000)]), "\n")...)
	chunked := *tok
	chunked.chunkBytes = 5
	chunked.cache = new(hfWordCache)
	whole := *tok
	whole.chunkBytes = 1 << 30
	whole.cache = new(hfWordCache)
	for _, s := range texts {
		got, want := chunked.Encode(s), whole.Encode(s)
		if !slices.Equal(got, want) {
			t.Fatalf("%q:\nchunked %v\n  whole %v", s, got, want)
		}
	}
	// A long line takes the chunked path at the default size too.
	long := strings.Repeat(string(prose[:2000])+" ", 10)
	long = strings.ReplaceAll(long, "\n", " ")
	if got, want := tok.Encode(long), whole.Encode(long); !slices.Equal(got, want) {
		t.Fatalf("a %d-byte line: chunked and whole differ", len(long))
	}
}
