package model

import (
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"testing"
)

// splitRunes are characters where the GPT-4 style pattern's alternatives meet: the letters
// of contractions in both cases, letters of several scripts, combining marks (not \p{L}),
// digits and other numbers, every kind of white space, \r and \n, punctuation, emoji, ZWJ.
var splitRunes = []rune("'sStTrReEvVmMlLdDaxZ é日ไกहि\u0301\u093f0195①½Ⅻ٣ \t\n\r\v\f\u0085\u00a0\u1680\u2003\u2028\u202f\u3000\ufeff.,;!?-_$%/()\"@#👍🏽\u200d🇫🇷")

func randSplitText(rng *rand.Rand) string {
	var sb strings.Builder
	for range rng.IntN(25) {
		sb.WriteRune(splitRunes[rng.IntN(len(splitRunes))])
	}
	return sb.String()
}

// TestHFFastSplitMatchesRegexp2 checks the hand-written matcher of the LLaMA-3 and Qwen
// split patterns against regexp2 running the pattern, on random texts, the golden lines
// and TinyStories prose; and that the shared tokenizers use it.
func TestHFFastSplitMatchesRegexp2(t *testing.T) {
	var texts []string
	for _, g := range readHFGolden(t, "llama3") {
		texts = append(texts, g.Text)
	}
	prose, err := os.ReadFile(sharedPath(t, "data/tinystories/valid.txt"))
	if err != nil {
		t.Fatal(err)
	}
	texts = append(texts, strings.Split(string(prose[:min(len(prose), 200000)]), "\n")...)
	rng := rand.New(rand.NewPCG(3, 4))
	n := 20000
	if testing.Short() {
		n = 2000
	}
	for range n {
		texts = append(texts, randSplitText(rng))
	}
	for _, pattern := range []string{llama3SplitPattern, qwenSplitPattern} {
		re, err := compileHFRegex("test", pattern)
		if err != nil {
			t.Fatal(err)
		}
		slow := hfSplitPre{re: re, behavior: hfIsolated}
		fast := fastSplitFor(pattern)
		for _, s := range texts {
			if got, want := fast.matches(s), slow.matches(s); !slices.Equal(got, want) {
				t.Fatalf("pattern %.40q… on %q:\n fast %v\nregex %v", pattern, s, got, want)
			}
		}
	}
	for _, name := range []string{"llama3", "qwen3"} {
		tok := loadSharedHF(t, name)
		if sp, ok := tok.pre[0].(hfSplitPre); !ok || sp.fast == nil {
			t.Errorf("%s: its Split pattern does not use the hand-written matcher", name)
		}
	}
}
