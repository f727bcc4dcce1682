package patch

import (
	"fmt"
	"math"

	"linearpatch/model"
)

// Columns of the zero-shot accuracy in the comparison table: one per task ("acc / acc_norm"
// in percent), then the retained accuracy — the mean over tasks of the variant's accuracy
// divided by the dense model's — for acc and acc_norm.

// TaskColumns returns the header cells for tasks (keyed like Compare's result; nil: none).
func TaskColumns(tasks map[string]model.TasksResult) []string {
	dense, ok := tasks[DenseName]
	if !ok {
		for _, r := range tasks { // any variant names the tasks
			dense = r
			break
		}
	}
	var cols []string
	for _, t := range dense.Tasks {
		cols = append(cols, t.Task+" acc / acc_norm")
	}
	if len(cols) > 0 {
		cols = append(cols, "retained acc", "retained acc_norm")
	}
	return cols
}

// TaskCells returns the cells of variant name, matching TaskColumns; "—" where it has no
// result (or there is no dense result to retain).
func TaskCells(tasks map[string]model.TasksResult, name string) []string {
	cols := TaskColumns(tasks)
	if len(cols) == 0 {
		return nil
	}
	cells := make([]string, len(cols))
	for i := range cells {
		cells[i] = "—"
	}
	r, ok := tasks[name]
	if !ok {
		return cells
	}
	for i, t := range r.Tasks {
		if i < len(cols)-2 {
			cells[i] = fmt.Sprintf("%.1f%% / %.1f%%", 100*t.Acc, 100*t.AccNorm)
		}
	}
	if dense, ok := tasks[DenseName]; ok {
		acc, norm := r.Retained(dense)
		cells[len(cells)-2], cells[len(cells)-1] = pct(acc), pct(norm)
	}
	return cells
}

func pct(v float64) string {
	if math.IsNaN(v) {
		return "—"
	}
	return fmt.Sprintf("%.2f%%", 100*v)
}

// evalNames returns the variants of the score and task tables in display order.
func evalNames(scores map[string]Score, tasks map[string]model.TasksResult) []string {
	all := make(map[string]Score, len(scores)+len(tasks))
	for n, s := range scores {
		all[n] = s
	}
	for n := range tasks {
		if _, ok := all[n]; !ok {
			all[n] = Score{}
		}
	}
	return SortedNames(all)
}
