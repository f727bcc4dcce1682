package patch

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"linearpatch/model"
	"linearpatch/model/tensor"
)

// TestCompareTasksMatchesPrunedModels: CompareTasks, which shares the layers before the cut,
// gives every variant the accuracies of the pruned model run on its own.
func TestCompareTasksMatchesPrunedModels(t *testing.T) {
	modelPath := filepath.Join(sharedDir, "models", "tinystories-8L")
	m, err := model.Load(modelPath)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := model.LoadTokenizer(modelPath, m.Vocab)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(sharedDir, "data", "tinystories", "mc.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	lines := bytes.SplitAfter(b, []byte("\n"))
	dir := t.TempDir()
	var paths []string
	per := 25
	if testing.Short() {
		per = 8
	}
	for i, name := range []string{"first.jsonl", "second.jsonl"} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, bytes.Join(lines[i*per:(i+1)*per], nil), 0o644); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	tasks, err := model.LoadTasks(paths, tok, m.Vocab, 0)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	P := tensor.New(m.Dim, m.Dim)
	for i := range m.Dim {
		for j := range m.Dim {
			v := 0.02 * float32(rng.NormFloat64())
			if i == j {
				v += 1
			}
			P.Row(i)[j] = v
		}
	}
	variants := []Variant{{Name: "none"}, {Name: "noisy", P: P}}
	got, err := CompareTasks(context.Background(), m, tasks, 3, 5, variants, nil)
	if err != nil {
		t.Fatal(err)
	}
	for name, mm := range map[string]*model.Model{DenseName: m, "none": m.Pruned(3, 5, nil), "noisy": m.Pruned(3, 5, P)} {
		want, err := mm.EvalTasks(context.Background(), tasks, nil)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got[name], want) {
			t.Errorf("%s: CompareTasks %+v, the model alone %+v", name, got[name], want)
		}
	}
	if len(got[DenseName].Tasks) != 2 || got[DenseName].Tasks[1].Task != "second" {
		t.Fatalf("dense tasks %+v", got[DenseName].Tasks)
	}
	if _, err := CompareTasks(context.Background(), m, tasks, 3, 5, []Variant{{Name: DenseName}}, nil); err == nil {
		t.Error("a variant named dense was accepted")
	}
}
