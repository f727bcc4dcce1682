package patch

import (
	"errors"
	"math"
	"testing"
)

func TestSelect(t *testing.T) {
	nan := math.NaN()
	tests := []struct {
		name       string
		cosine     []float64
		layers, n  int
		allowEdges bool
		want       int
		wantErr    bool
	}{
		{"interior maximum", []float64{0.1, 0.5, 0.9, 0.3, 0.2}, 6, 2, false, 2, false},
		{"edge maxima ignored", []float64{0.99, 0.5, 0.6, 0.4, 0.98}, 6, 2, false, 2, false},
		{"first edge allowed", []float64{0.99, 0.5, 0.6, 0.4, 0.98}, 6, 2, true, 0, false},
		{"last edge allowed", []float64{0.1, 0.5, 0.6, 0.4, 0.98}, 6, 2, true, 4, false},
		{"tie goes to lowest start", []float64{0.1, 0.7, 0.3, 0.7, 0.1}, 6, 2, false, 1, false},
		{"tie with edge", []float64{0.7, 0.7, 0.3, 0.7, 0.7}, 6, 2, true, 0, false},
		{"single candidate", []float64{0.9, 0.1, 0.9}, 4, 2, false, 1, false},
		{"NaN skipped", []float64{0.1, nan, 0.2, 0.1, 0.1}, 6, 2, false, 2, false},
		{"negative cosines", []float64{-0.1, -0.5, -0.2, -0.3, -0.1}, 6, 2, false, 2, false},
		{"golden tinystories-8L", []float64{0.770142, 0.856668, 0.875509, 0.89608, 0.86992, 0.823443, 0.775994}, 8, 2, false, 3, false},
		{"golden stories260K", []float64{0.679535, 0.661341, 0.700526, 0.723988, 0.705985}, 5, 1, false, 3, false},
		{"n = L−1 without edges", []float64{0.5, 0.6}, 4, 3, false, 0, true},
		{"n = L−1 with edges", []float64{0.5, 0.6}, 4, 3, true, 1, false},
		{"n = L", []float64{0.5}, 4, 4, true, 0, true},
		{"n = 0", []float64{0.5, 0.5, 0.5, 0.5, 0.5}, 4, 0, true, 0, true},
		{"wrong length", []float64{0.5, 0.6, 0.7}, 6, 2, false, 0, true},
		{"all candidates NaN", []float64{0.9, nan, nan, 0.9}, 5, 2, false, 0, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Select(tc.cosine, tc.layers, tc.n, tc.allowEdges)
			if tc.wantErr {
				if !errors.Is(err, ErrBlock) {
					t.Fatalf("Select = %d, %v; want ErrBlock", got, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("Select = %d, %v; want %d", got, err, tc.want)
			}
		})
	}
}
