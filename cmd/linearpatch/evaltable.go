package main

import (
	"fmt"
	"io"
	"math"
	"strings"

	"linearpatch/model"
	"linearpatch/patch"
)

// evalTables is what the comparison of a pruned model's variants found: perplexity, KL and
// top-1 on --eval (by protocol) and the zero-shot accuracy on --eval-tasks.
type evalTables struct {
	protocol model.Protocol
	scores   map[string]patch.Score       // nil without --eval
	tasks    map[string]model.TasksResult // nil without --eval-tasks
}

func (e evalTables) empty() bool { return e.scores == nil && e.tasks == nil }

// retainedJSON is a variant's retained accuracy: the mean over tasks of its accuracy
// divided by the dense model's.
// A field is absent when no task has a positive dense accuracy.
type retainedJSON struct {
	Acc     *float64 `json:"acc,omitempty"`
	AccNorm *float64 `json:"acc_norm,omitempty"`
}

// retained returns every variant's retained accuracy (nil without tasks or a dense result).
func (e evalTables) retained() map[string]retainedJSON {
	dense, ok := e.tasks[patch.DenseName]
	if !ok {
		return nil
	}
	out := map[string]retainedJSON{}
	for n, r := range e.tasks {
		acc, norm := r.Retained(dense)
		var rj retainedJSON
		if !math.IsNaN(acc) {
			rj.Acc = &acc
		}
		if !math.IsNaN(norm) {
			rj.AccNorm = &norm
		}
		out[n] = rj
	}
	return out
}

// printScores prints the comparison table: perplexity (with its protocol), KL and top-1
// from --eval; a column per task and the retained accuracy from --eval-tasks.
func printScores(w io.Writer, e evalTables) {
	if e.empty() {
		return
	}
	head, rule := []string{"model"}, []string{"---"}
	if e.scores != nil {
		head = append(head, fmt.Sprintf("perplexity (%s)", e.protocol), "vs dense", "KL to dense", "top-1 agreement")
		rule = append(rule, "---:", "---:", "---:", "---:")
	}
	for _, c := range patch.TaskColumns(e.tasks) {
		head, rule = append(head, c), append(rule, "---:")
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "| %s |\n|%s|\n", strings.Join(head, " | "), strings.Join(rule, "|"))
	all := map[string]patch.Score{}
	for n, sc := range e.scores {
		all[n] = sc
	}
	for n := range e.tasks {
		if _, ok := all[n]; !ok {
			all[n] = patch.Score{}
		}
	}
	dense := e.scores[patch.DenseName].PPL
	for _, n := range patch.SortedNames(all) {
		row := []string{n}
		if e.scores != nil {
			if sc, ok := e.scores[n]; ok {
				row = append(row, fmt.Sprintf("%.4f", sc.PPL), fmt.Sprintf("%+.2f%%", 100*(sc.PPL/dense-1)), fmt.Sprintf("%.5f", sc.KL), fmt.Sprintf("%.2f%%", 100*sc.Top1))
			} else {
				row = append(row, "—", "—", "—", "—")
			}
		}
		row = append(row, patch.TaskCells(e.tasks, n)...)
		fmt.Fprintf(w, "| %s |\n", strings.Join(row, " | "))
	}
}
