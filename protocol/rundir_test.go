package protocol

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestRunState(t *testing.T) {
	dir := t.TempDir()
	if p, err := ReadRunState(dir); p != nil || err != nil {
		t.Fatalf("empty directory: %v %v", p, err)
	}
	p := testPlan(t, 10, 100, 4)
	if err := WriteRunState(dir, p); err != nil {
		t.Fatal(err)
	}
	got, err := ReadRunState(dir)
	if err != nil || !reflect.DeepEqual(got, p) {
		t.Fatalf("read back %+v, %v", got, err)
	}
	// A run directory written by version 1: run.id and a plan without a version.
	old := t.TempDir()
	if err := os.WriteFile(filepath.Join(old, RunIDFile), []byte("r0123456789ab"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(old, PlanFile), []byte(`{"run_id":"r0123456789ab","settings":{}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadRunState(old); !errors.Is(err, ErrVersion) || !strings.Contains(err.Error(), "version 1") {
		t.Errorf("version-1 run directory: %v", err)
	}
	if _, err := os.Stat(filepath.Join(old, FitFile)); err == nil {
		t.Fatal("unexpected fit")
	}
}
