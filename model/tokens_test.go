package model

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestReadTokenStreamGolden(t *testing.T) {
	sp := tinyTokenizer(t)
	shared := tokShared(t)
	for name, want := range loadTokGolden(t).TokenizeFiles {
		t.Run(name, func(t *testing.T) {
			stream, err := ReadTokenStream(filepath.Join(shared, filepath.FromSlash(name)), sp, sp.VocabSize())
			if err != nil {
				t.Fatal(err)
			}
			if len(stream) != want.NumTokens {
				t.Errorf("%d tokens, want %d", len(stream), want.NumTokens)
			}
			if len(stream) < 64 {
				t.Fatalf("stream too short: %d", len(stream))
			}
			if got := stream[:64]; !slices.Equal(got, want.First64) {
				t.Errorf("first 64\n got %v\nwant %v", got, want.First64)
			}
			if got := stream[len(stream)-64:]; !slices.Equal(got, want.Last64) {
				t.Errorf("last 64\n got %v\nwant %v", got, want.Last64)
			}
		})
	}
}

func TestReadTokenStreamJSONL(t *testing.T) {
	path := filepath.Join(tokShared(t), "data", "stories260K", "calib.jsonl")
	stream, err := ReadTokenStream(path, nil, 512)
	if err != nil {
		t.Fatal(err)
	}
	// An independent reading: one JSON object per line.
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var want []int
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	lines := 0
	for sc.Scan() {
		var rec map[string][]int
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			t.Fatal(err)
		}
		if len(rec["input_ids"]) != 256 || rec["input_ids"][0] != 1 {
			t.Fatalf("line %d: %d ids starting %d", lines+1, len(rec["input_ids"]), rec["input_ids"][0])
		}
		want = append(want, rec["input_ids"]...)
		lines++
	}
	if lines != 160 || !slices.Equal(stream, want) {
		t.Fatalf("%d lines, %d tokens (want %d, same as an independent reading: %v)", lines, len(stream), len(want), slices.Equal(stream, want))
	}
	w := Windows(stream, 256, 0)
	if len(w) != 160 {
		t.Fatalf("%d windows of 256, want 160", len(w))
	}
	for i, win := range w {
		if win[0] != 1 {
			t.Fatalf("window %d starts with %d, not BOS", i, win[0])
		}
	}
}

// fakeTokenizer encodes each byte as its value + 3 (BOS 1, EOS 2), vocabulary 259.
type fakeTokenizer struct{}

func (fakeTokenizer) Encode(text string) []int {
	ids := []int{}
	for i := 0; i < len(text); i++ {
		ids = append(ids, int(text[i])+3)
	}
	return ids
}

func (fakeTokenizer) Decode(ids []int) string {
	var b []byte
	for _, id := range ids {
		if id >= 3 && id < 259 {
			b = append(b, byte(id-3))
		}
	}
	return string(b)
}
func (fakeTokenizer) VocabSize() int     { return 259 }
func (fakeTokenizer) BOS() int           { return 1 }
func (fakeTokenizer) DocumentStart() int { return 1 }
func (fakeTokenizer) EOS() int           { return 2 }

func writeData(t *testing.T, name, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func fakeIDs(prefix bool, s string) []int {
	ids := fakeTokenizer{}.Encode(s)
	if prefix {
		ids = append([]int{1}, ids...)
	}
	return ids
}

func TestReadTokenStreamFormats(t *testing.T) {
	long := strings.Repeat("x", 200_000) // past bufio.Scanner's 64 KiB limit
	longIDs := strings.TrimSuffix(strings.Repeat("7, ", 100_000), ", ")
	for _, c := range []struct {
		name, file, content string
		tok                 Tokenizer
		want                []int
	}{
		{"text", "d.txt", "ab\ncd\n", fakeTokenizer{}, slices.Concat(fakeIDs(true, "ab"), fakeIDs(true, "cd"))},
		{"text blank lines skipped", "d.txt", "\n  \t\nab\n\r\n \n", fakeTokenizer{}, fakeIDs(true, "ab")},
		{"text crlf, no final newline", "d.txt", "ab\r\ncd", fakeTokenizer{}, slices.Concat(fakeIDs(true, "ab"), fakeIDs(true, "cd"))},
		{"text line kept whole", "d.txt", " a b\t\n", fakeTokenizer{}, fakeIDs(true, " a b\t")},
		{"text long line", "d.txt", long + "\n", fakeTokenizer{}, fakeIDs(true, long)},
		{"empty file", "d.txt", "", fakeTokenizer{}, nil},
		{"jsonl", "d.jsonl", `{"input_ids": [1, 5, 7]}` + "\n" + `{"input_ids": [1, 9]}` + "\n", nil, []int{1, 5, 7, 1, 9}},
		{"jsonl crlf and blank lines", "d.jsonl", "\r\n" + `{"input_ids": [1, 5]}` + "\r\n\n  \n" + `{"input_ids":[], "other": "x"}`, nil, []int{1, 5}},
		{"json extension", "d.json", `{"input_ids": [3]}`, nil, []int{3}},
		{"jsonl sniffed", "d.data", "  \n " + `{"input_ids": [4]}`, fakeTokenizer{}, []int{4}},
		{"jsonl long line", "d.jsonl", `{"input_ids": [` + longIDs + `]}`, nil, slices.Repeat([]int{7}, 100_000)},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := ReadTokenStream(writeData(t, c.file, c.content), c.tok, 300)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, c.want) {
				if len(got) > 20 || len(c.want) > 20 {
					t.Fatalf("got %d ids, want %d", len(got), len(c.want))
				}
				t.Fatalf("got %v, want %v", got, c.want)
			}
		})
	}
}

func TestReadTokenStreamBadInput(t *testing.T) {
	for _, c := range []struct {
		name, file, content string
		tok                 Tokenizer
		vocab               int
		is                  error
		msg                 []string // substrings of the message: file, line, id
	}{
		{"invalid json", "d.jsonl", `{"input_ids": [1]}` + "\n" + `{"input_ids": [1,` + "\n", nil, 512, ErrData, []string{"d.jsonl:2"}},
		{"not an object", "d.jsonl", "[1, 2]\n", nil, 512, ErrData, []string{"d.jsonl:1"}},
		{"no input_ids", "d.jsonl", `{"ids": [1]}`, nil, 512, ErrData, []string{"d.jsonl:1", "input_ids"}},
		{"fractional id", "d.jsonl", `{"input_ids": [1.5]}`, nil, 512, ErrData, []string{"d.jsonl:1"}},
		{"id too large", "d.jsonl", "\n" + `{"input_ids": [1]}` + "\n" + `{"input_ids": [3, 512]}`, nil, 512, ErrData, []string{"d.jsonl:3", "512"}},
		{"negative id", "d.jsonl", `{"input_ids": [-1]}`, nil, 512, ErrData, []string{"d.jsonl:1", "-1"}},
		{"huge id", "d.jsonl", `{"input_ids": [99999999999999999999]}`, nil, 512, ErrData, []string{"d.jsonl:1"}},
		{"text without tokenizer", "d.txt", "Once upon a time\n", nil, 512, ErrNoTokenizer, []string{"d.txt", "no tokenizer", "input_ids"}},
		{"tokenizer id past vocab", "d.txt", "a\nb\x7f\n", fakeTokenizer{}, 130, ErrData, []string{"d.txt:2", "130"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := ReadTokenStream(writeData(t, c.file, c.content), c.tok, c.vocab)
			if !errors.Is(err, c.is) {
				t.Fatalf("err = %v, want %v", err, c.is)
			}
			for _, m := range c.msg {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("error %q does not name %q", err, m)
				}
			}
		})
	}
	_, err := ReadTokenStream(filepath.Join(t.TempDir(), "missing.txt"), fakeTokenizer{}, 512)
	if !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("missing file: err = %v", err)
	}
}

func TestTokenStreamWindows(t *testing.T) {
	stream := []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}
	for _, c := range []struct {
		seqLen, max int
		want        [][]int
	}{
		{3, 0, [][]int{{0, 1, 2}, {3, 4, 5}, {6, 7, 8}}},
		{3, 2, [][]int{{0, 1, 2}, {3, 4, 5}}},
		{3, 9, [][]int{{0, 1, 2}, {3, 4, 5}, {6, 7, 8}}},
		{5, 0, [][]int{{0, 1, 2, 3, 4}, {5, 6, 7, 8, 9}}},
		{1, 0, [][]int{{0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}, {8}, {9}}},
		{11, 0, [][]int{}},
	} {
		t.Run(fmt.Sprintf("%d/%d", c.seqLen, c.max), func(t *testing.T) {
			got := Windows(stream, c.seqLen, c.max)
			if !slices.EqualFunc(got, c.want, slices.Equal) {
				t.Fatalf("got %v, want %v", got, c.want)
			}
		})
	}
	w := Windows(stream, 3, 0)
	w[0][0] = 100
	if stream[0] != 100 {
		t.Error("windows do not alias the stream")
	}
	_ = append(w[0], -1)
	if stream[3] != 3 {
		t.Error("appending to a window overwrote the next one")
	}
	defer func() {
		if recover() == nil {
			t.Error("Windows with seqLen 0 did not panic")
		}
	}()
	Windows(stream, 0, 0)
}

// FuzzReadTokenStream feeds arbitrary bytes as a JSON Lines file (vocab 512, no tokenizer)
// and, sniffed, with the tinystories tokenizer. It must not panic; on success every id is
// in range and, for JSON Lines, the stream is the concatenation an independent reading
// gives; every failure wraps ErrData.
func FuzzReadTokenStream(f *testing.F) {
	sp := tinyTokenizer(f)
	calib, err := os.ReadFile(filepath.Join(tokShared(f), "data", "stories260K", "calib.jsonl"))
	if err != nil {
		f.Fatal(err)
	}
	first, _, _ := bytes.Cut(calib, []byte("\n"))
	for _, s := range []string{
		"", "\n", string(first), string(first) + "\n" + string(first),
		`{"input_ids": [1, 2, 3]}`, `{"input_ids": [512]}`, `{"input_ids": [-1]}`,
		`{"input_ids": null}`, `{"input_ids": [1e3]}`, `{"input_ids": "x"}`, `{}`, `{`,
		"\r\n" + `{"input_ids": [0]}` + "\r\n", "Once upon a time\n\nThe end.", "\xff\x00{",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		stream, err := readTokenStream(bytes.NewReader(data), "fuzz.jsonl", FormatJSONL, nil, 512)
		if err != nil {
			if !errors.Is(err, ErrData) {
				t.Fatalf("error does not wrap ErrData: %v", err)
			}
		} else {
			var want []int
			for _, line := range strings.Split(string(data), "\n") {
				if strings.TrimSpace(line) == "" {
					continue
				}
				var rec struct {
					InputIDs []int `json:"input_ids"`
				}
				if err := json.Unmarshal([]byte(line), &rec); err != nil {
					t.Fatalf("accepted a line an independent reading rejects: %q: %v", line, err)
				}
				want = append(want, rec.InputIDs...)
			}
			if !slices.Equal(stream, want) {
				t.Fatalf("stream %v, independent reading %v", stream, want)
			}
			for _, id := range stream {
				if id < 0 || id >= 512 {
					t.Fatalf("id %d out of range", id)
				}
			}
		}
		stream, err = readTokenStream(bytes.NewReader(data), "fuzz", FormatText, sp, 1024)
		if err != nil && !errors.Is(err, ErrData) {
			t.Fatalf("sniffed: error does not wrap ErrData: %v", err)
		}
		for _, id := range stream {
			if id < 0 || id >= 1024 {
				t.Fatalf("sniffed: id %d out of range", id)
			}
		}
	})
}
