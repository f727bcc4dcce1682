package model

import (
	"bufio"
	"encoding/json"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// hfGoldenNames are the tokenizers of ../shared/tokenizers with golden outputs.
var hfGoldenNames = []string{"llama3", "qwen3", "mistral"}

var hfCache sync.Map // name → *HFTokenizer: loading LLaMA-3's is ~1 s

func loadSharedHF(t testing.TB, name string) *HFTokenizer {
	t.Helper()
	if v, ok := hfCache.Load(name); ok {
		return v.(*HFTokenizer)
	}
	tok, err := LoadHFTokenizer(sharedPath(t, filepath.Join("tokenizers", name)))
	if err != nil {
		t.Fatal(err)
	}
	hfCache.Store(name, tok)
	return tok
}

type hfGoldenLine struct {
	Text     string `json:"text"`
	InputIDs []int  `json:"input_ids"`
}

func readHFGolden(t testing.TB, name string) []hfGoldenLine {
	t.Helper()
	f, err := os.Open(sharedPath(t, filepath.Join("golden", "tokenizers", name+".jsonl")))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []hfGoldenLine
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<24)
	for sc.Scan() {
		var g hfGoldenLine
		if err := json.Unmarshal(sc.Bytes(), &g); err != nil {
			t.Fatalf("%s golden: %v", name, err)
		}
		out = append(out, g)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if len(out) == 0 {
		t.Fatalf("%s golden is empty", name)
	}
	return out
}

// TestHFTokenizerGolden checks every line of the golden files made with transformers.js:
// DocumentStart() followed by Encode(text) is the line's input_ids.
func TestHFTokenizerGolden(t *testing.T) {
	for _, name := range hfGoldenNames {
		t.Run(name, func(t *testing.T) {
			tok := loadSharedHF(t, name)
			bad := 0
			for i, g := range readHFGolden(t, name) {
				got := append([]int{tok.DocumentStart()}, tok.Encode(g.Text)...)
				if !slices.Equal(got, g.InputIDs) {
					bad++
					if bad <= 10 {
						t.Errorf("line %d %q:\n got %v\nwant %v", i+1, g.Text, got, g.InputIDs)
					}
				}
			}
			if bad > 0 {
				t.Errorf("%d golden lines differ", bad)
			}
		})
	}
}

// threadCPU is the CPU time of the calling thread (0 where unavailable); the benchmark
// locks its goroutine to one thread.
func threadCPU() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(rusageThread, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkHFTokenizerEncode reports encoding throughput (MB/s of text, one goroutine) of
// each shared tokenizer on the golden lines (a multilingual mix) and on TinyStories prose.
func BenchmarkHFTokenizerEncode(b *testing.B) {
	lines := readHFGolden(b, "llama3")
	var mixed []string
	for _, g := range lines {
		mixed = append(mixed, g.Text)
	}
	prose, err := os.ReadFile(sharedPath(b, filepath.Join("data", "tinystories", "valid.txt")))
	if err != nil {
		b.Fatal(err)
	}
	if len(prose) > 1<<20 {
		prose = prose[:1<<20]
	}
	texts := map[string][]string{"lines": mixed, "prose": strings.Split(string(prose), "\n")}
	for _, name := range hfGoldenNames {
		tok := loadSharedHF(b, name)
		for _, kind := range []string{"lines", "prose"} {
			b.Run(name+"/"+kind, func(b *testing.B) {
				runtime.LockOSThread()
				defer runtime.UnlockOSThread()
				n := 0
				for _, s := range texts[kind] {
					n += len(s)
				}
				b.SetBytes(int64(n))
				cpu0 := threadCPU()
				for b.Loop() {
					for _, s := range texts[kind] {
						tok.Encode(s)
					}
				}
				// The wall clock of a shared machine overstates the time: report the
				// throughput per second of this thread's CPU time too.
				if d := threadCPU() - cpu0; d > 0 {
					b.ReportMetric(float64(n)*float64(b.N)/1e6/d.Seconds(), "MB/cpu-s")
				}
			})
		}
	}
}

// TestHFTokenizerConcurrent: goroutines sharing one tokenizer (and its word cache) get the
// golden ids.
func TestHFTokenizerConcurrent(t *testing.T) {
	for _, name := range []string{"qwen3", "mistral"} {
		tok := *loadSharedHF(t, name)
		tok.cache = new(hfWordCache) // cold, so the goroutines fill it together
		golden := readHFGolden(t, name)
		var wg sync.WaitGroup
		errs := make(chan string, 4)
		for g := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range golden {
					l := golden[(i+g*50)%len(golden)]
					if got := append([]int{tok.DocumentStart()}, tok.Encode(l.Text)...); !slices.Equal(got, l.InputIDs) {
						errs <- name + ": " + l.Text
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for e := range errs {
			t.Error("concurrent encode differs:", e)
		}
	}
}
