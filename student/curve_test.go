package student

import (
	"bytes"
	"errors"
	"math"
	"os"
	"path/filepath"
	"testing"
)

// TestWriteCurvePNG draws a decaying noisy training curve and a validation curve; the file
// is a PNG. Set STUDENT_CURVE_PNG=path to keep a copy for a look.
func TestWriteCurvePNG(t *testing.T) {
	var train, valid []CurvePoint
	for s := 1; s <= 400; s++ {
		l := 0.1 + 0.3*math.Exp(-float64(s)/80) + 0.03*math.Sin(float64(s)*1.7)
		train = append(train, CurvePoint{s, l})
		if s%50 == 0 {
			valid = append(valid, CurvePoint{s, 0.11 + 0.3*math.Exp(-float64(s)/80)})
		}
	}
	train[10].Loss = math.NaN() // left out
	valid = append([]CurvePoint{{0, 0.42}}, valid...)
	path := filepath.Join(t.TempDir(), "loss.png")
	if keep := os.Getenv("STUDENT_CURVE_PNG"); keep != "" {
		path = keep
	}
	if err := WriteCurvePNG(path, train, valid); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(b, []byte("\x89PNG\r\n\x1a\n")) || len(b) < 5000 {
		t.Fatalf("not a PNG (%d bytes)", len(b))
	}
	if err := WriteCurvePNG(path, nil, []CurvePoint{{1, math.NaN()}}); !errors.Is(err, ErrOptions) {
		t.Fatalf("no finite point: %v", err)
	}
	// Only a validation curve, or a single point, still draws.
	if err := WriteCurvePNG(path+"2.png", []CurvePoint{{1, 0.3}}, nil); err != nil {
		t.Fatal(err)
	}
}
