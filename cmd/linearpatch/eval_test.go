package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/apache/arrow/go/v17/arrow"
	"github.com/apache/arrow/go/v17/arrow/array"
	"github.com/apache/arrow/go/v17/arrow/ipc"
	"github.com/apache/arrow/go/v17/arrow/memory"

	"linearpatch/model"
)

// taskSlice writes lines [lo, hi) of the shared mc.jsonl to dir/name.
func taskSlice(t *testing.T, dir, name string, lo, hi int) string {
	t.Helper()
	b, err := os.ReadFile(shared(t, "data/tinystories/mc.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	lines := bytes.SplitAfter(b, []byte("\n"))
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, bytes.Join(lines[lo:hi], nil), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

type evalOut struct {
	PPL          float64 `json:"ppl"`
	Windows      int     `json:"windows"`
	Protocol     string  `json:"protocol"`
	StreamTokens int     `json:"stream_tokens"`
	model.TasksResult
}

// TestEvalJoinAndTasks: eval --protocol join reads valid.txt as golden/join.json does (the
// token count) and names the protocol; --tasks takes several files (repeated flag and
// trailing arguments) and reports each task and the means.
func TestEvalJoinAndTasks(t *testing.T) {
	dir := t.TempDir()
	m := shared(t, "models/tinystories-8L")
	var g struct{ Tokens int }
	readJSON(t, shared(t, "golden/join.json"), &g)
	a, b := taskSlice(t, dir, "a.jsonl", 0, 12), taskSlice(t, dir, "b.jsonl", 12, 20)
	out, err := runCLI(t, "eval", "--model", m, "--data", shared(t, "data/tinystories/valid.txt"), "--protocol", "join",
		"--max-windows", "2", "--tasks", a, b, "--json")
	if err != nil {
		t.Fatal(err)
	}
	var r evalOut
	lastJSON(t, out, &r)
	if r.Protocol != "join" || r.Windows != 2 || r.StreamTokens != g.Tokens || !(r.PPL > 1) {
		t.Fatalf("join: %+v, want protocol join, 2 windows, %d stream tokens", r, g.Tokens)
	}
	if len(r.Tasks) != 2 || r.Tasks[0].Task != "a" || r.Tasks[0].Items != 12 || r.Tasks[1].Items != 8 {
		t.Fatalf("tasks %+v", r.Tasks)
	}
	if want := (r.Tasks[0].Acc + r.Tasks[1].Acc) / 2; r.MeanAcc != want {
		t.Fatalf("mean acc %v, want %v", r.MeanAcc, want)
	}
	lines, err := runCLI(t, "eval", "--model", m, "--data", shared(t, "data/tinystories/valid.txt"), "--max-windows", "2")
	if err != nil || !strings.Contains(lines, "(lines protocol;") {
		t.Fatalf("lines: %v\n%s", err, lines)
	}
}

// TestEvalArrowMatchesText: an Arrow IPC stream copy of valid.txt (column "story", one row
// per line, several record batches) gives exactly the text file's perplexity under lines.
func TestEvalArrowMatchesText(t *testing.T) {
	b, err := os.ReadFile(shared(t, "data/tinystories/valid.txt"))
	if err != nil {
		t.Fatal(err)
	}
	rows := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	path := filepath.Join(t.TempDir(), "data-00000-of-00001.arrow")
	sch := arrow.NewSchema([]arrow.Field{{Name: "story", Type: arrow.BinaryTypes.String}}, nil)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	w := ipc.NewWriter(f, ipc.WithSchema(sch))
	for lo := 0; lo < len(rows); lo += 500 {
		bld := array.NewStringBuilder(memory.DefaultAllocator)
		bld.AppendValues(rows[lo:min(lo+500, len(rows))], nil)
		col := bld.NewArray()
		rec := array.NewRecord(sch, []arrow.Array{col}, int64(col.Len()))
		if err := w.Write(rec); err != nil {
			t.Fatal(err)
		}
		rec.Release()
		col.Release()
		bld.Release()
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	m := shared(t, "models/tinystories-8L")
	var fromText, fromArrow evalOut
	out, err := runCLI(t, "eval", "--model", m, "--data", shared(t, "data/tinystories/valid.txt"), "--max-windows", "8", "--json")
	if err != nil {
		t.Fatal(err)
	}
	lastJSON(t, out, &fromText)
	out, err = runCLI(t, "eval", "--model", m, "--data", path, "--text-column", "story", "--max-windows", "8", "--json")
	if err != nil {
		t.Fatal(err)
	}
	lastJSON(t, out, &fromArrow)
	if fromArrow.PPL != fromText.PPL || fromArrow.Windows != 8 || fromArrow.Protocol != "lines" {
		t.Fatalf("arrow %+v, text %+v", fromArrow, fromText)
	}
	if _, err := runCLI(t, "eval", "--model", m, "--data", path, "--max-windows", "8"); err == nil || !strings.Contains(err.Error(), `"text"`) {
		t.Fatalf("default column on a file without it: %v", err)
	}
}

func TestEvalTasksBadInput(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	m := shared(t, "models/tinystories-8L")
	bad := write("bad.jsonl", `{"context": "a", "choices": [" b"], "label": 0}`+"\n"+`{"context": "a", "choices": [" b"], "label": 3}`+"\n")
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"label out of range", []string{"eval", "--model", m, "--tasks", bad}, "bad.jsonl:2"},
		{"missing task file", []string{"eval", "--model", m, "--tasks", filepath.Join(dir, "none.jsonl")}, "none.jsonl"},
		{"nothing to do", []string{"eval", "--model", m}, "--data or --tasks"},
		{"arguments without --tasks", []string{"eval", "--model", m, "--data", "x", "y.jsonl"}, "more task files follow --tasks"},
		{"bad protocol", []string{"eval", "--model", m, "--data", "x", "--protocol", "windows"}, "--protocol"},
		{"tasks without tokenizer", []string{"eval", "--model", shared(t, "models/stories260K/stories260K.bin"), "--tasks", bad}, "tokenizer"},
		{"prune checks tasks before calibrating", []string{"prune", "--model", m, "--calib", shared(t, "data/tinystories/train.txt"),
			"--num-prune", "2", "--out", filepath.Join(dir, "out"), "--eval-tasks", bad}, "bad.jsonl:2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := runCLI(t, tc.args...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one mentioning %q", err, tc.want)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(dir, "out")); !os.IsNotExist(err) {
		t.Errorf("prune left --out behind: %v", err)
	}
}

// TestPruneEvalTasks: prune --eval-tasks adds every variant's accuracy, a column per task
// and the retained accuracy to the JSON, the table and the report, and names the protocol.
func TestPruneEvalTasks(t *testing.T) {
	dir := t.TempDir()
	tasks := taskSlice(t, dir, "cloze.jsonl", 0, 16)
	out, err := runCLI(t, "prune", "--model", shared(t, "models/tinystories-8L"), "--calib", shared(t, "data/tinystories/train.txt"),
		"--calib-windows", "4", "--num-prune", "2", "--method", "all", "--eval", shared(t, "data/tinystories/valid.txt"),
		"--eval-windows", "4", "--protocol", "join", "--eval-tasks", tasks, "--out", filepath.Join(dir, "pruned"),
		"--report", filepath.Join(dir, "report"), "--json")
	if err != nil {
		t.Fatal(err)
	}
	var r struct {
		Protocol string
		PPL      map[string]float64
		Tasks    map[string]model.TasksResult
		Retained map[string]struct {
			Acc     *float64 `json:"acc"`
			AccNorm *float64 `json:"acc_norm"`
		}
	}
	lastJSON(t, out, &r)
	if r.Protocol != "join" || len(r.PPL) != 5 {
		t.Fatalf("protocol %q, ppl %v", r.Protocol, r.PPL)
	}
	for _, v := range []string{"dense", "none", "diag", "rotate", "lstsq"} {
		tr, ok := r.Tasks[v]
		if !ok || len(tr.Tasks) != 1 || tr.Tasks[0].Items != 16 {
			t.Fatalf("%s: tasks %+v", v, tr)
		}
		ret := r.Retained[v]
		if ret.Acc == nil || ret.AccNorm == nil {
			t.Fatalf("%s: no retained accuracy", v)
		}
		dense := r.Tasks["dense"].Tasks[0]
		if want := tr.Tasks[0].Acc / dense.Acc; *ret.Acc != want {
			t.Errorf("%s: retained acc %v, want %v", v, *ret.Acc, want)
		}
	}
	if !strings.Contains(out, "| model | perplexity (join) | vs dense | KL to dense | top-1 agreement | cloze acc / acc_norm | retained acc | retained acc_norm |") ||
		!strings.Contains(out, "| dense | ") || !strings.Contains(out, "| 100.00% | 100.00% |") {
		t.Errorf("comparison table lacks the task columns:\n%s", out)
	}
	md, err := os.ReadFile(filepath.Join(dir, "report", "report.md"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(md), "(join protocol)") || !strings.Contains(string(md), "cloze acc / acc_norm") {
		t.Errorf("report lacks the protocol or the task column:\n%s", md)
	}
	rec, err := os.ReadFile(filepath.Join(dir, "pruned", "linearpatch.json"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(rec), `"eval_protocol": "join"`) || !strings.Contains(string(rec), `"eval_tasks"`) {
		t.Errorf("linearpatch.json lacks the protocol or the tasks:\n%s", rec)
	}
}

// TestRunEvalTasks: run (here without --train: stats phase and export only) compares the
// variants on --eval-tasks too, and names --eval's protocol.
func TestRunEvalTasks(t *testing.T) {
	dir := t.TempDir()
	tasks := taskSlice(t, dir, "cloze.jsonl", 20, 30)
	out, err := runCLI(t, "run", "--model", shared(t, "models/tinystories-8L"), "--calib", shared(t, "data/tinystories/train.txt"),
		"--calib-windows", "4", "--num-prune", "2", "--teachers", "1", "--eval", shared(t, "data/tinystories/valid.txt"),
		"--eval-windows", "2", "--protocol", "join", "--eval-tasks", tasks, "--out", filepath.Join(dir, "pruned"), "--json")
	if err != nil {
		t.Fatal(err)
	}
	var r struct {
		Protocol string
		PPL      map[string]float64
		Tasks    map[string]model.TasksResult
		Retained map[string]map[string]float64
	}
	lastJSON(t, out, &r)
	if r.Protocol != "join" || len(r.PPL) != 3 || len(r.Tasks) != 3 || r.Tasks["rotate"].Tasks[0].Items != 10 || r.Retained["dense"]["acc"] != 1 {
		t.Fatalf("run JSON: %+v", r)
	}
	if !strings.Contains(out, "cloze acc / acc_norm") {
		t.Errorf("no task column in the table:\n%s", out)
	}
}

// TestStudentEvalTasks: the offline student compares dense, none, the training-free patch
// and kd on --eval-tasks as well, naming --eval's protocol.
func TestStudentEvalTasks(t *testing.T) {
	dir := t.TempDir()
	b, err := os.ReadFile(shared(t, "data/tinystories/train.txt"))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.SplitAfter(string(b), "\n")
	train := filepath.Join(dir, "train.txt")
	if err := os.WriteFile(train, []byte(strings.Join(lines[:40], "")), 0o644); err != nil {
		t.Fatal(err)
	}
	m := shared(t, "models/tinystories-8L")
	runDir := filepath.Join(dir, "run")
	if _, err := runCLI(t, "run", "--model", m, "--calib", train, "--calib-windows", "4", "--train", train, "--num-prune", "2",
		"--shard-windows", "8", "--top-k", "8", "--teachers", "1", "--distill=false", "--out", filepath.Join(dir, "cacheonly"), "--run-dir", runDir); err != nil {
		t.Fatal(err)
	}
	tasks := taskSlice(t, dir, "cloze.jsonl", 30, 40)
	out, err := runCLI(t, "student", "--run-dir", runDir, "--out", filepath.Join(dir, "kd"), "--eval", shared(t, "data/tinystories/valid.txt"),
		"--eval-windows", "2", "--protocol", "join", "--eval-tasks", tasks, "--json")
	if err != nil {
		t.Fatal(err)
	}
	var r struct {
		Protocol string
		PPL      map[string]float64
		Tasks    map[string]model.TasksResult
		Retained map[string]map[string]float64
	}
	lastJSON(t, out, &r)
	if r.Protocol != "join" || len(r.PPL) != 4 || len(r.Tasks) != 4 || r.Tasks["kd"].Tasks[0].Items != 10 || len(r.Retained) != 4 {
		t.Fatalf("student JSON: %+v", r)
	}
	if !strings.Contains(out, "| kd | ") || !strings.Contains(out, "cloze acc / acc_norm") {
		t.Errorf("no kd row or task column:\n%s", out)
	}
}
