package patch

import (
	"context"
	"errors"
	"math"
	"strings"
	"testing"

	"linearpatch/model"
)

// TestCompareNaNIsAnError: a score that comes out NaN is an error naming the model variant,
// never a NaN in the table.
func TestCompareNaNIsAnError(t *testing.T) {
	m, err := model.Synthetic(model.Config{Dim: 16, FFN: 32, Layers: 4, Heads: 2, Vocab: 32}, 1)
	if err != nil {
		t.Fatal(err)
	}
	windows := [][]int{{1, 2, 3, 4, 5, 6, 7, 8}, {8, 7, 6, 5, 4, 3, 2, 1}}
	if _, err := Compare(context.Background(), m, windows, 1, 2, []Variant{{Name: "none"}}, nil); err != nil {
		t.Fatalf("finite model: %v", err)
	}
	m.Layers[3].Wdown.Data[0] = float32(math.NaN())
	_, err = Compare(context.Background(), m, windows, 1, 2, []Variant{{Name: "none"}}, nil)
	if !errors.Is(err, model.ErrNotFinite) || !strings.Contains(err.Error(), "dense") && !strings.Contains(err.Error(), "none") {
		t.Fatalf("NaN weights: %v, want model.ErrNotFinite naming the variant", err)
	}
}
