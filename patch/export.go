package patch

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"linearpatch/model"
	"linearpatch/model/tensor"
)

// RecordFile is the name of the provenance record an exported model carries.
const RecordFile = "linearpatch.json"

// ErrExists is returned when the export directory already exists.
var ErrExists = errors.New("patch: output directory already exists")

// Record is linearpatch.json: how an exported model was made from its original.
type Record struct {
	FormatVersion int              `json:"format_version"`
	Source        SourceModel      `json:"source"`
	Start         int              `json:"start"`                 // first removed layer i (original numbering)
	End           int              `json:"end"`                   // first kept layer after the cut j
	NumPrune      int              `json:"num_prune"`             // j − i
	Method        string           `json:"method"`                // none, diag, rotate, lstsq or kd
	PatchTensor   string           `json:"patch_tensor"`          // tensor name in model.safetensors; "" for none
	PatchBefore   int              `json:"patch_before"`          // pruned-model layer whose input the patch transforms
	Scale         []float64        `json:"scale,omitempty"`       // s of diag/rotate
	Hadamard      string           `json:"hadamard,omitempty"`    // H's construction when Method or InitMethod is rotate; set by Export
	InitMethod    string           `json:"init_method,omitempty"` // for kd: the training-free patch P was distilled from
	Cosine        []float64        `json:"cosine"`                // mean per-token cosine of X_i and X_{i+n}, i = 0..L−n
	Calibration   Calibration      `json:"calibration"`
	Ridge         float64          `json:"ridge,omitempty"`
	Eval          map[string]Score `json:"eval,omitempty"`
	Extra         map[string]any   `json:"extra,omitempty"`
}

// SourceModel identifies the original model.
type SourceModel struct {
	Path        string `json:"path"`
	Fingerprint string `json:"fingerprint"` // model.Fingerprint of the original
	Layers      int    `json:"layers"`
	Dim         int    `json:"dim"`
}

// Calibration records the calibration pass.
type Calibration struct {
	File    string `json:"file"`
	Windows int    `json:"windows"`
	SeqLen  int    `json:"seq_len"`
	Tokens  int64  `json:"tokens"`
}

// Export writes the pruned model — layers [rec.Start, rec.End) of m removed, the rest
// renumbered, P (nil for none) applied at the cut — as a Hugging Face directory at dir with
// rec as linearpatch.json (Export fills its derived fields: format version, num_prune,
// patch tensor and position, and the Hadamard construction of a rotate patch, so every
// command writes the same record). Everything is written into a temporary sibling directory that
// is renamed to dir at the end, so on error nothing appears at dir. dir must not exist.
func Export(dir string, m *model.Model, P *tensor.Matrix, rec Record) error {
	st, err := StageExport(dir, m, P, rec)
	if err != nil {
		return err
	}
	if err := st.Commit(); err != nil {
		return fmt.Errorf("patch: export %s: %w", dir, err)
	}
	return nil
}

// StageExport is Export without the final rename: the caller commits the returned Staged
// (or discards it) together with its other outputs.
func StageExport(dir string, m *model.Model, P *tensor.Matrix, rec Record) (*Staged, error) {
	if _, err := os.Stat(dir); err == nil {
		return nil, fmt.Errorf("%w: %s", ErrExists, dir)
	}
	if err := m.CheckBlock(rec.Start, rec.End); err != nil {
		return nil, err
	}
	rec.FormatVersion = 1
	rec.NumPrune = rec.End - rec.Start
	rec.PatchBefore = rec.Start
	rec.PatchTensor = ""
	if P != nil {
		rec.PatchTensor = model.PatchTensorName
	}
	rec.Hadamard = ""
	if rec.Method == string(MethodRotate) || rec.InitMethod == string(MethodRotate) {
		h, err := NewHadamard(m.Dim)
		if err != nil {
			return nil, fmt.Errorf("patch: export: %w", err)
		}
		rec.Hadamard = h.Construction()
	}
	st, err := stage(dir)
	if err != nil {
		return nil, fmt.Errorf("patch: export: %w", err)
	}
	tmp := st.Dir()
	fail := func(err error) (*Staged, error) {
		st.Discard()
		return nil, fmt.Errorf("patch: export %s: %w", dir, err)
	}
	if err := m.Pruned(rec.Start, rec.End, P).Save(tmp); err != nil {
		return fail(err)
	}
	b, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return fail(err)
	}
	if err := os.WriteFile(filepath.Join(tmp, RecordFile), append(b, '\n'), 0o644); err != nil {
		return fail(err)
	}
	for _, f := range model.TokenizerFiles {
		if err := copyIfExists(filepath.Join(rec.Source.Path, f), filepath.Join(tmp, f)); err != nil {
			return fail(err)
		}
	}
	return st, nil
}

// ReadRecord reads linearpatch.json from an exported model directory.
func ReadRecord(dir string) (Record, error) {
	var r Record
	b, err := os.ReadFile(filepath.Join(dir, RecordFile))
	if err != nil {
		return r, fmt.Errorf("patch: %w", err)
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("patch: %s: %w", filepath.Join(dir, RecordFile), err)
	}
	return r, nil
}

func copyIfExists(src, dst string) error {
	b, err := os.ReadFile(src)
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
		return nil
	}
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o644)
}
