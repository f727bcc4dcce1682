package model

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"

	"linearpatch/model/tensor"
)

// Zero-shot multiple choice, scored as lm-eval's loglikelihood requests with a document
// start in front of every context (lm-eval adds none by default; LLaMA-family models expect
// one).

// ErrTask is wrapped by every error about the content of a multiple-choice task file.
var ErrTask = errors.New("model: bad task file")

// Task is one multiple-choice task file, tokenized: every item's candidate sequences.
type Task struct {
	Name  string // the file's base name without its extension
	Path  string
	Items []MCItem
}

// MCItem is one question: a sequence per candidate (a choice, or a context for partial
// scoring), each the document start (when the tokenizer has one), the context ids and the
// continuation ids, and the label of the right candidate.
type MCItem struct {
	Seqs     [][]int
	ContFrom []int // Seqs[c][ContFrom[c]:] is the continuation that is scored
	Bytes    []int // UTF-8 length of candidate c's choice (the continuation for partial scoring)
	Label    int
}

// taskLine is one line of a task file: {"context", "choices", "label"} or
// {"contexts", "continuation", "label"}.
type taskLine struct {
	Context      *string   `json:"context"`
	Choices      *[]string `json:"choices"`
	Contexts     *[]string `json:"contexts"`
	Continuation *string   `json:"continuation"`
	Label        *int      `json:"label"`
}

// LoadTask reads a JSON Lines task file and tokenizes it with tok. Each non-blank line is
// {"context": string, "choices": [string, ...], "label": int} or, for partial scoring
// (WinoGrande), {"contexts": [string, ...], "continuation": string, "label": int}.
// For a candidate with context x and continuation y: context ids = tok.Encode(x), the
// continuation = tok.Encode(x + y) without its first len(context ids) ids, and the scored
// sequence is the document start, the context ids and the continuation.
//
// A line without those fields, a label out of range, an empty choice (or continuation), a
// candidate whose continuation has no tokens of its own, an id outside [0, vocab) or a
// sequence longer than maxSeq (> 0) is an error wrapping ErrTask naming the file and the
// 1-based line; so is a file without items. tok must not be nil.
func LoadTask(path string, tok Tokenizer, vocab, maxSeq int) (*Task, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("model: read task: %w", err)
	}
	t := &Task{Name: strings.TrimSuffix(filepath.Base(path), filepath.Ext(path)), Path: path}
	start := tok.DocumentStart()
	for lineNo, line := range bytes.Split(b, []byte("\n")) {
		line = bytes.TrimSpace(line)
		if len(line) == 0 {
			continue
		}
		where := fmt.Sprintf("%s:%d", path, lineNo+1)
		bad := func(format string, args ...any) error {
			return fmt.Errorf("%w: %s: %s", ErrTask, where, fmt.Sprintf(format, args...))
		}
		var l taskLine
		if err := json.Unmarshal(line, &l); err != nil {
			return nil, bad("%v", err)
		}
		var contexts, conts []string
		switch {
		case l.Context != nil || l.Choices != nil:
			if l.Context == nil || l.Choices == nil || l.Label == nil {
				return nil, bad(`a line needs "context", "choices" and "label" (or "contexts", "continuation" and "label")`)
			}
			for i, c := range *l.Choices {
				if c == "" {
					return nil, bad("choice %d is empty", i)
				}
				contexts, conts = append(contexts, *l.Context), append(conts, c)
			}
		case l.Contexts != nil || l.Continuation != nil:
			if l.Contexts == nil || l.Continuation == nil || l.Label == nil {
				return nil, bad(`a line needs "contexts", "continuation" and "label" (or "context", "choices" and "label")`)
			}
			if *l.Continuation == "" {
				return nil, bad("the continuation is empty")
			}
			for _, c := range *l.Contexts {
				contexts, conts = append(contexts, c), append(conts, *l.Continuation)
			}
		default:
			return nil, bad(`a line needs "context", "choices" and "label" (or "contexts", "continuation" and "label")`)
		}
		if *l.Label < 0 || *l.Label >= len(conts) {
			return nil, bad("label %d out of range for %d candidates", *l.Label, len(conts))
		}
		it := MCItem{Label: *l.Label}
		encoded := map[string][]int{} // the choices of one item share its context
		for c := range conts {
			ctxIDs, ok := encoded[contexts[c]]
			if !ok {
				ctxIDs = tok.Encode(contexts[c])
				encoded[contexts[c]] = ctxIDs
			}
			whole := tok.Encode(contexts[c] + conts[c])
			if len(whole) <= len(ctxIDs) {
				return nil, bad("candidate %d: the continuation %q adds no token to the context", c, conts[c])
			}
			var seq []int
			if start >= 0 {
				seq = append(seq, start)
			}
			seq = append(seq, ctxIDs...)
			if len(seq) == 0 {
				return nil, bad("candidate %d: empty context and no document start token: the first continuation token has nothing to be predicted from", c)
			}
			from := len(seq)
			seq = append(seq, whole[len(ctxIDs):]...)
			for _, id := range seq {
				if id < 0 || id >= vocab {
					return nil, bad("token id %d outside the vocabulary [0,%d) (tokenizer and model disagree)", id, vocab)
				}
			}
			if maxSeq > 0 && len(seq) > maxSeq {
				return nil, bad("candidate %d is %d tokens, more than the model's %d positions", c, len(seq), maxSeq)
			}
			it.Seqs = append(it.Seqs, seq)
			it.ContFrom = append(it.ContFrom, from)
			it.Bytes = append(it.Bytes, len(conts[c]))
		}
		t.Items = append(t.Items, it)
	}
	if len(t.Items) == 0 {
		return nil, fmt.Errorf("%w: %s has no items", ErrTask, path)
	}
	return t, nil
}

// LoadTasks loads every task file (see LoadTask); two files with the same base name are an
// error, since results are keyed by it.
func LoadTasks(paths []string, tok Tokenizer, vocab, maxSeq int) ([]*Task, error) {
	if tok == nil && len(paths) > 0 {
		return nil, fmt.Errorf("%w: multiple-choice tasks are text: the model needs a tokenizer", ErrNoTokenizer)
	}
	seen := map[string]string{}
	var tasks []*Task
	for _, p := range paths {
		t, err := LoadTask(p, tok, vocab, maxSeq)
		if err != nil {
			return nil, err
		}
		if q, ok := seen[t.Name]; ok {
			return nil, fmt.Errorf("%w: %s and %s are both task %q", ErrTask, q, p, t.Name)
		}
		seen[t.Name] = p
		tasks = append(tasks, t)
	}
	return tasks, nil
}

// MCBatch is one forward's worth of candidate sequences, right-padded to a common length
// T (padding after a sequence cannot change its logits in a causal model).
type MCBatch struct {
	IDs  [][]int // each of length T
	T    int
	refs []mcRef
}

type mcRef struct{ item, cand, n int } // n: the sequence's unpadded length

// Batches cuts the task's sequences into batches of at most about rows tokens (padded)
// and of logits of at most about 64 MiB, never splitting an item unless it alone exceeds
// that; the order is the items'. rows ≤ 0 means 2048.
func (t *Task) Batches(rows, vocab int) []MCBatch {
	if rows <= 0 {
		rows = 2048
	}
	rows = max(1, min(rows, (16<<20)/max(vocab, 1)))
	var out []MCBatch
	var cur []mcRef
	curT := 0
	flush := func() {
		if len(cur) == 0 {
			return
		}
		b := MCBatch{T: curT, refs: cur}
		for _, r := range cur {
			seq := t.Items[r.item].Seqs[r.cand]
			padded := make([]int, curT)
			copy(padded, seq)
			for i := len(seq); i < curT; i++ {
				padded[i] = seq[len(seq)-1]
			}
			b.IDs = append(b.IDs, padded)
		}
		out = append(out, b)
		cur, curT = nil, 0
	}
	for i, it := range t.Items {
		itT := 0
		for _, s := range it.Seqs {
			itT = max(itT, len(s))
		}
		if len(cur) > 0 && (len(cur)+len(it.Seqs))*max(curT, itT) > rows {
			flush()
		}
		for c, s := range it.Seqs {
			if len(cur) > 0 && (len(cur)+1)*max(curT, len(s)) > rows {
				flush() // one item larger than a batch
			}
			cur = append(cur, mcRef{item: i, cand: c, n: len(s)})
			curT = max(curT, len(s))
		}
	}
	flush()
	return out
}

// MCScores accumulates the candidates' scores of one task.
type MCScores struct {
	task   *Task
	scores [][]float64 // [item][candidate]: sum of log p over the continuation
	done   [][]bool
}

// NewMCScores returns an empty accumulator for t.
func NewMCScores(t *Task) *MCScores {
	s := &MCScores{task: t, scores: make([][]float64, len(t.Items)), done: make([][]bool, len(t.Items))}
	for i, it := range t.Items {
		s.scores[i] = make([]float64, len(it.Seqs))
		s.done[i] = make([]bool, len(it.Seqs))
	}
	return s
}

// Add scores the batch's sequences from logits (the batch's rows stacked: row b·T+p
// predicts position p+1 of sequence b): the sum over the continuation's positions p of
// log softmax(logits[p−1])[id_p], in float64. It panics when logits does not have the
// batch's shape.
func (s *MCScores) Add(b MCBatch, logits *tensor.Matrix) {
	if logits.Rows != len(b.IDs)*b.T {
		panic(fmt.Sprintf("model: MCScores.Add: %d logit rows for %d sequences of %d", logits.Rows, len(b.IDs), b.T))
	}
	for k, r := range b.refs {
		seq := s.task.Items[r.item].Seqs[r.cand]
		from := s.task.Items[r.item].ContFrom[r.cand]
		var sum float64
		for p := from; p < r.n; p++ {
			row := logits.Row(k*b.T + p - 1)
			sum += float64(row[seq[p]]) - float64(tensor.LogSumExp(row))
		}
		s.scores[r.item][r.cand] = sum
		s.done[r.item][r.cand] = true
	}
}

// TaskResult is one task's accuracy: acc takes the candidate with the highest score,
// acc_norm the highest score per byte of the choice; ties go to the first candidate.
type TaskResult struct {
	Task        string  `json:"task"`
	File        string  `json:"file"`
	Items       int     `json:"items"`
	Correct     int     `json:"correct"`
	CorrectNorm int     `json:"correct_norm"`
	Acc         float64 `json:"acc"`
	AccNorm     float64 `json:"acc_norm"`
}

// Result returns the task's accuracies. It panics when a sequence was not scored.
func (s *MCScores) Result() TaskResult {
	r := TaskResult{Task: s.task.Name, File: s.task.Path, Items: len(s.task.Items)}
	for i, it := range s.task.Items {
		best, bestNorm := 0, 0
		for c, sc := range s.scores[i] {
			if !s.done[i][c] {
				panic(fmt.Sprintf("model: MCScores.Result: item %d candidate %d not scored", i, c))
			}
			if sc > s.scores[i][best] {
				best = c
			}
			if sc/float64(it.Bytes[c]) > s.scores[i][bestNorm]/float64(it.Bytes[bestNorm]) {
				bestNorm = c
			}
		}
		if best == it.Label {
			r.Correct++
		}
		if bestNorm == it.Label {
			r.CorrectNorm++
		}
	}
	r.Acc = float64(r.Correct) / float64(r.Items)
	r.AccNorm = float64(r.CorrectNorm) / float64(r.Items)
	return r
}

// TasksResult is the accuracy on every task and the means over tasks.
type TasksResult struct {
	Tasks       []TaskResult `json:"tasks"`
	MeanAcc     float64      `json:"mean_acc"`
	MeanAccNorm float64      `json:"mean_acc_norm"`
}

// NewTasksResult computes the means over rs.
func NewTasksResult(rs []TaskResult) TasksResult {
	out := TasksResult{Tasks: rs}
	for _, r := range rs {
		out.MeanAcc += r.Acc / float64(len(rs))
		out.MeanAccNorm += r.AccNorm / float64(len(rs))
	}
	return out
}

// Retained returns the mean over tasks of r's accuracy divided by dense's, for acc and
// acc_norm (the paper's "retained %", as fractions). Tasks are matched by name; a task
// where the dense model scores 0 is left out; NaN when no task is left.
func (r TasksResult) Retained(dense TasksResult) (acc, accNorm float64) {
	byName := map[string]TaskResult{}
	for _, d := range dense.Tasks {
		byName[d.Task] = d
	}
	var na, nn int
	for _, t := range r.Tasks {
		d, ok := byName[t.Task]
		if !ok {
			continue
		}
		if d.Acc > 0 {
			acc += t.Acc / d.Acc
			na++
		}
		if d.AccNorm > 0 {
			accNorm += t.AccNorm / d.AccNorm
			nn++
		}
	}
	acc, accNorm = acc/float64(na), accNorm/float64(nn)
	if na == 0 {
		acc = math.NaN()
	}
	if nn == 0 {
		accNorm = math.NaN()
	}
	return acc, accNorm
}

// TaskRows is the number of batched sequence rows the task evaluation runs per forward.
const TaskRows = 2048

// EvalTasks scores every task with m (patch included) and returns the accuracies.
// progress, when non-nil, gets the number of batches done over all tasks. It stops with
// ctx's error when ctx ends (checked between batches).
func (m *Model) EvalTasks(ctx context.Context, tasks []*Task, progress func(done int)) (TasksResult, error) {
	var rs []TaskResult
	done := 0
	for _, t := range tasks {
		sc := NewMCScores(t)
		for _, b := range t.Batches(TaskRows, m.Vocab) {
			if err := ctx.Err(); err != nil {
				return TasksResult{}, err
			}
			sc.Add(b, m.Forward(b.IDs))
			done++
			if progress != nil {
				progress(done)
			}
		}
		rs = append(rs, sc.Result())
	}
	return NewTasksResult(rs), nil
}

// TaskBatches is the number of batches EvalTasks runs over tasks (for a progress bar).
func TaskBatches(tasks []*Task, vocab int) int {
	n := 0
	for _, t := range tasks {
		n += len(t.Batches(TaskRows, vocab))
	}
	return n
}
