package patch

import (
	"context"
	"fmt"

	"linearpatch/model"
	"linearpatch/model/tensor"
)

// CompareTasks scores the dense model and every variant of pruning [start, end) on the
// multiple-choice tasks (see model.LoadTask), keyed like Compare's result (DenseName and
// the variants' names). As in Compare, the layers before the cut run once per batch and
// are shared by all variants. progress, when non-nil, gets the number of batches done
// (model.TaskBatches in all). It stops with ctx's error when ctx ends.
func CompareTasks(ctx context.Context, m *model.Model, tasks []*model.Task, start, end int, variants []Variant, progress func(done int)) (map[string]model.TasksResult, error) {
	if err := m.CheckBlock(start, end); err != nil {
		return nil, err
	}
	if len(tasks) == 0 {
		return nil, fmt.Errorf("patch: compare tasks: no tasks")
	}
	names := []string{DenseName}
	seen := map[string]bool{DenseName: true}
	for _, v := range variants {
		if seen[v.Name] {
			return nil, fmt.Errorf("patch: compare tasks: duplicate variant %q", v.Name)
		}
		seen[v.Name] = true
		names = append(names, v.Name)
	}
	L := m.Config.Layers
	results := make(map[string][]model.TaskResult, len(names))
	done := 0
	for _, t := range tasks {
		sc := make(map[string]*model.MCScores, len(names))
		for _, n := range names {
			sc[n] = model.NewMCScores(t)
		}
		for _, b := range t.Batches(model.TaskRows, m.Vocab) {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			xi := m.Embeddings(b.IDs)
			m.RunLayers(xi, b.T, 0, start, nil)
			dense := xi.Clone()
			m.RunLayers(dense, b.T, start, L, nil)
			sc[DenseName].Add(b, m.Logits(dense))
			for _, v := range variants {
				x := xi.Clone()
				if v.P != nil {
					tensor.Mul(x, xi, v.P)
				}
				m.RunLayers(x, b.T, end, L, nil)
				sc[v.Name].Add(b, m.Logits(x))
			}
			done++
			if progress != nil {
				progress(done)
			}
		}
		for _, n := range names {
			results[n] = append(results[n], sc[n].Result())
		}
	}
	out := make(map[string]model.TasksResult, len(names))
	for n, rs := range results {
		out[n] = model.NewTasksResult(rs)
	}
	return out, nil
}
