package patch

import (
	"path/filepath"
	"strings"
	"testing"

	"linearpatch/model"
	"linearpatch/model/tensor"
)

// TestExportRecordHadamard: Export writes the Hadamard construction the code builds —
// H_m on the left of the Kronecker product — for a rotate patch and for a kd patch
// distilled from one, and nothing for other methods.
func TestExportRecordHadamard(t *testing.T) {
	m, err := model.Synthetic(model.Config{Dim: 48, Layers: 4, Heads: 4, KVHeads: 2, FFN: 64, Vocab: 32, MaxSeq: 64}, 3)
	if err != nil {
		t.Fatal(err)
	}
	P := tensor.New(48, 48)
	for i := range 48 {
		P.Data[i*48+i] = 1
	}
	for _, c := range []struct {
		method, init string
		want         string
	}{
		{"rotate", "", "(H_12 ⊗ S_4)/√48"},
		{"kd", "rotate", "(H_12 ⊗ S_4)/√48"},
		{"kd", "diag", ""},
		{"lstsq", "", ""},
	} {
		dir := filepath.Join(t.TempDir(), "out")
		rec := Record{Source: SourceModel{Path: "synthetic", Layers: 4, Dim: 48}, Start: 1, End: 2, Method: c.method, InitMethod: c.init,
			Hadamard: "stale value the caller left"}
		if err := Export(dir, m, P, rec); err != nil {
			t.Fatal(err)
		}
		got, err := ReadRecord(dir)
		if err != nil {
			t.Fatal(err)
		}
		if c.want == "" && got.Hadamard != "" || c.want != "" && !strings.HasPrefix(got.Hadamard, c.want) {
			t.Errorf("%s from %q: hadamard %q, want prefix %q", c.method, c.init, got.Hadamard, c.want)
		}
		if c.want != "" && !strings.Contains(got.Hadamard, "left of the Kronecker product") {
			t.Errorf("%s: hadamard %q does not say which factor is on the left", c.method, got.Hadamard)
		}
	}
	h, _ := NewHadamard(64)
	if got := h.Construction(); !strings.HasPrefix(got, "S_64/√64") {
		t.Errorf("d = 64: %q", got)
	}
}
