package model

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"linearpatch/model/tensor"
)

type goldenMC struct {
	Task  string `json:"task"`
	Model string `json:"model"`
	Dense struct {
		Items   int     `json:"items"`
		Acc     float64 `json:"acc"`
		AccNorm float64 `json:"acc_norm"`
	} `json:"dense"`
	Pruned struct {
		Items   int     `json:"items"`
		Acc     float64 `json:"acc"`
		AccNorm float64 `json:"acc_norm"`
	} `json:"pruned_3_5_none"`
}

// TestMCGolden: the dense model and block [3, 5) plainly pruned match golden/mc.json — the
// item counts exactly, acc and acc_norm within one item.
func TestMCGolden(t *testing.T) {
	b, err := os.ReadFile(sharedPath(t, "golden/mc.json"))
	if err != nil {
		t.Fatal(err)
	}
	var g goldenMC
	if err := json.Unmarshal(b, &g); err != nil {
		t.Fatal(err)
	}
	m, err := Load(sharedPath(t, g.Model))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := LoadTokenizer(sharedPath(t, g.Model), m.Vocab)
	if err != nil {
		t.Fatal(err)
	}
	tasks, err := LoadTasks([]string{sharedPath(t, g.Task)}, tok, m.Vocab, m.Config.MaxSeq)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name         string
		m            *Model
		items        int
		acc, accNorm float64
	}{
		{"dense", m, g.Dense.Items, g.Dense.Acc, g.Dense.AccNorm},
		{"pruned [3,5) none", m.Pruned(3, 5, nil), g.Pruned.Items, g.Pruned.Acc, g.Pruned.AccNorm},
	} {
		if testing.Short() && c.m != m {
			t.Logf("%s: skipped under -short (the dense model is checked)", c.name)
			continue
		}
		res, err := c.m.EvalTasks(context.Background(), tasks, nil)
		if err != nil {
			t.Fatal(err)
		}
		r := res.Tasks[0]
		oneItem := 1/float64(c.items) + 1e-9
		if r.Items != c.items || math.Abs(r.Acc-c.acc) > oneItem || math.Abs(r.AccNorm-c.accNorm) > oneItem {
			t.Errorf("%s: %d items, acc %.4f, acc_norm %.4f; want %d, %.4f, %.4f (within one item)", c.name, r.Items, r.Acc, r.AccNorm, c.items, c.acc, c.accNorm)
		}
		if res.MeanAcc != r.Acc || res.MeanAccNorm != r.AccNorm {
			t.Errorf("%s: means over one task %v %v differ from the task's", c.name, res.MeanAcc, res.MeanAccNorm)
		}
		t.Logf("%s: acc %.3f acc_norm %.3f (golden %.3f %.3f)", c.name, r.Acc, r.AccNorm, c.acc, c.accNorm)
	}
}

// TestMCBatchedMatchesOneByOne: a candidate's score from a padded batch of several items
// equals the naive score of the sequence run alone, and the continuation is what the rule
// says: encode(context + choice) without its first len(encode(context)) ids.
func TestMCBatchedMatchesOneByOne(t *testing.T) {
	m, err := Load(sharedPath(t, "models/tinystories-8L"))
	if err != nil {
		t.Fatal(err)
	}
	tok := tinyTokenizer(t)
	path := writeData(t, "tasks.jsonl", strings.Join([]string{
		`{"context": "Once upon a time, there was a", "choices": [" little girl.", " dog", " big red ball that rolled away"], "label": 0}`,
		`{"context": "Tom liked to", "choices": [" play.", " eat"], "label": 1, "extra": "ignored"}`,
		``,
		`{"contexts": ["The cat sat on the mat, so the", "The dog sat on the mat, so the"], "continuation": " cat was happy.", "label": 1}`,
	}, "\n"))
	task, err := LoadTask(path, tok, m.Vocab, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(task.Items) != 3 || task.Name != "tasks" {
		t.Fatalf("%d items named %q", len(task.Items), task.Name)
	}
	it := task.Items[0]
	ctx := tok.Encode("Once upon a time, there was a")
	whole := tok.Encode("Once upon a time, there was a little girl.")
	if want := slices.Concat([]int{tok.DocumentStart()}, ctx, whole[len(ctx):]); !slices.Equal(it.Seqs[0], want) || it.ContFrom[0] != 1+len(ctx) || it.Bytes[0] != len(" little girl.") {
		t.Fatalf("sequence %v from %d, want %v from %d", it.Seqs[0], it.ContFrom[0], want, 1+len(ctx))
	}
	for _, rows := range []int{1, 40, 2048} {
		sc := NewMCScores(task)
		bs := task.Batches(rows, m.Vocab)
		for _, b := range bs {
			sc.Add(b, m.Forward(b.IDs))
		}
		for i, it := range task.Items {
			for c, seq := range it.Seqs {
				logits := m.Forward([][]int{seq})
				var want float64
				for p := it.ContFrom[c]; p < len(seq); p++ {
					row := logits.Row(p - 1)
					want += float64(row[seq[p]]) - float64(tensor.LogSumExp(row))
				}
				if got := sc.scores[i][c]; math.Abs(got-want) > 1e-3 {
					t.Errorf("rows %d (%d batches): item %d candidate %d: batched %.5f, alone %.5f", rows, len(bs), i, c, got, want)
				}
			}
		}
		r := sc.Result()
		if r.Items != 3 {
			t.Fatalf("%d items", r.Items)
		}
	}
}

// TestMCResultTiesAndNorm: acc takes the highest score, acc_norm the highest per byte,
// ties go to the first candidate; Retained divides by the dense accuracy per task.
func TestMCResultTiesAndNorm(t *testing.T) {
	task := &Task{Name: "t", Items: []MCItem{
		{Seqs: make([][]int, 2), Bytes: []int{1, 4}, Label: 1}, // scores -2, -4: acc picks 0, norm picks 1
		{Seqs: make([][]int, 2), Bytes: []int{2, 2}, Label: 1}, // a tie: both pick 0
	}}
	sc := NewMCScores(task)
	sc.scores = [][]float64{{-2, -4}, {-3, -3}}
	sc.done = [][]bool{{true, true}, {true, true}}
	r := sc.Result()
	if r.Correct != 0 || r.CorrectNorm != 1 || r.Acc != 0 || r.AccNorm != 0.5 {
		t.Fatalf("result %+v", r)
	}
	dense := NewTasksResult([]TaskResult{{Task: "a", Acc: 0.8, AccNorm: 0.5}, {Task: "b", Acc: 0.5, AccNorm: 0}})
	v := NewTasksResult([]TaskResult{{Task: "a", Acc: 0.4, AccNorm: 0.25}, {Task: "b", Acc: 0.5, AccNorm: 0.1}})
	if math.Abs(dense.MeanAcc-0.65) > 1e-12 {
		t.Fatalf("mean acc %v", dense.MeanAcc)
	}
	acc, norm := v.Retained(dense)
	if math.Abs(acc-0.75) > 1e-12 || math.Abs(norm-0.5) > 1e-12 {
		t.Fatalf("retained %v %v, want 0.75 0.5", acc, norm)
	}
}

// TestMCBadInput: clear errors naming the file and line.
func TestMCBadInput(t *testing.T) {
	tok := tinyTokenizer(t)
	for _, c := range []struct{ name, content, msg string }{
		{"no label", `{"context": "a", "choices": [" b"]}`, "t.jsonl:1"},
		{"no choices", "\n" + `{"context": "a", "label": 0}`, "t.jsonl:2"},
		{"no fields", `{"question": "a"}`, `"context", "choices" and "label"`},
		{"contexts without continuation", `{"contexts": ["a"], "label": 0}`, `"continuation"`},
		{"label out of range", `{"context": "a", "choices": [" b", " c"], "label": 2}`, "label 2 out of range"},
		{"negative label", `{"context": "a", "choices": [" b"], "label": -1}`, "label -1"},
		{"empty choice", `{"context": "a", "choices": [" b", ""], "label": 0}`, "choice 1 is empty"},
		{"empty continuation", `{"contexts": ["a"], "continuation": "", "label": 0}`, "continuation is empty"},
		{"not json", `{"context": "a", `, "t.jsonl:1"},
		{"empty file", "\n\n", "no items"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := LoadTasks([]string{writeData(t, "t.jsonl", c.content)}, tok, 1024, 0)
			if !errors.Is(err, ErrTask) || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("err = %v, want ErrTask naming %q", err, c.msg)
			}
		})
	}
	long := writeData(t, "t.jsonl", `{"context": "`+strings.Repeat("Once upon a time. ", 100)+`", "choices": [" b"], "label": 0}`)
	if _, err := LoadTask(long, tok, 1024, 64); !errors.Is(err, ErrTask) || !strings.Contains(err.Error(), "positions") {
		t.Fatalf("too long: err = %v", err)
	}
	if _, err := LoadTasks([]string{long}, nil, 1024, 0); !errors.Is(err, ErrNoTokenizer) {
		t.Fatalf("no tokenizer: err = %v", err)
	}
}

// FuzzLoadTask: any bytes as a task file load without panicking; failures wrap ErrTask
// (or are I/O errors), and every item loaded has its label in range and a continuation of
// at least one token after a non-empty prefix.
func FuzzLoadTask(f *testing.F) {
	for _, s := range []string{
		`{"context": "a", "choices": [" b", " c"], "label": 1}`,
		`{"contexts": ["a", "b"], "continuation": " c", "label": 0}`,
		`{"context": "", "choices": ["x"], "label": 0}`,
		`{"context": "a", "choices": [], "label": 0}`,
		`{"context": 1, "choices": [" b"], "label": 0}`,
		`{"context": "a", "choices": [" b"], "label": 1.5}`,
		"\n\n", `[]`, `{`, "\xff",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(t.TempDir(), "t.jsonl")
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		task, err := LoadTask(path, fakeTokenizer{}, 300, 0)
		if err != nil {
			if !errors.Is(err, ErrTask) {
				t.Fatalf("error does not wrap ErrTask: %v", err)
			}
			return
		}
		for i, it := range task.Items {
			if it.Label < 0 || it.Label >= len(it.Seqs) {
				t.Fatalf("item %d: label %d of %d", i, it.Label, len(it.Seqs))
			}
			for c, s := range it.Seqs {
				if it.ContFrom[c] < 1 || it.ContFrom[c] >= len(s) || it.Bytes[c] < 1 {
					t.Fatalf("item %d candidate %d: continuation from %d of %d, %d bytes", i, c, it.ContFrom[c], len(s), it.Bytes[c])
				}
			}
		}
	})
}
