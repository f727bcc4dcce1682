package patch

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"linearpatch/model"
)

// TestExportModes: an exported model directory is 0755 and its files 0644 whatever the
// temporary directory and files it was staged in (MkdirTemp 0700, CreateTemp 0600).
func TestExportModes(t *testing.T) {
	old := syscall.Umask(0o022)
	defer syscall.Umask(old)
	m, err := model.Synthetic(model.Config{Dim: 16, FFN: 32, Layers: 4, Heads: 2, Vocab: 32}, 1)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "out")
	if err := Export(dir, m, nil, Record{Start: 1, End: 2, Method: "none"}); err != nil {
		t.Fatal(err)
	}
	check := func(path string, want os.FileMode) {
		t.Helper()
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if got := st.Mode().Perm(); got != want {
			t.Errorf("%s has mode %v, want %v", filepath.Base(path), got, want)
		}
	}
	check(dir, 0o755)
	for _, f := range []string{"config.json", "model.safetensors", RecordFile} {
		check(filepath.Join(dir, f), 0o644)
	}
}

// TestStagedOutputs: staged exports and reports appear only on Commit, Discard leaves
// nothing, and a destination that appeared meanwhile is not replaced.
func TestStagedOutputs(t *testing.T) {
	m, err := model.Synthetic(model.Config{Dim: 16, FFN: 32, Layers: 4, Heads: 2, Vocab: 32}, 1)
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	dir := filepath.Join(root, "out")
	st, err := StageExport(dir, m, nil, Record{Start: 1, End: 2, Method: "none"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); err == nil {
		t.Fatal("a staged export is visible before its commit")
	}
	st.Discard()
	if ents, _ := os.ReadDir(root); len(ents) != 0 {
		t.Fatalf("Discard left %v", ents)
	}
	st, err = StageExport(dir, m, nil, Record{Start: 1, End: 2, Method: "none"})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := st.Commit(); !errors.Is(err, ErrExists) {
		t.Fatalf("commit over a directory that appeared meanwhile: %v, want ErrExists", err)
	}
	if ents, _ := os.ReadDir(root); len(ents) != 1 {
		t.Fatalf("a failed commit left %v", ents)
	}

	if err := CheckDest(filepath.Join(root, "out")); !errors.Is(err, ErrExists) {
		t.Errorf("CheckDest of an existing directory: %v, want ErrExists", err)
	}
	file := filepath.Join(root, "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := CheckDest(filepath.Join(file, "a", "out")); err == nil {
		t.Error("CheckDest below a file passed")
	}
	if err := CheckDest(filepath.Join(root, "new", "deeper", "out")); err != nil {
		t.Errorf("CheckDest below missing directories: %v", err)
	}
	if ents, _ := os.ReadDir(root); len(ents) != 2 {
		t.Errorf("CheckDest left %v", ents)
	}
}
