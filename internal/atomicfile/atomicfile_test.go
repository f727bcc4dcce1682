package atomicfile

import (
	"os"
	"path/filepath"
	"testing"
)

func TestWrite(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f.json")
	for _, c := range []struct {
		data string
		perm os.FileMode
	}{{"first", 0o644}, {"second, longer", 0o600}} {
		if err := Write(p, []byte(c.data), c.perm); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(p)
		if err != nil || string(b) != c.data {
			t.Fatalf("read %q, %v; want %q", b, err, c.data)
		}
		if fi, _ := os.Stat(p); fi.Mode().Perm() != c.perm {
			t.Fatalf("mode %v, want %v", fi.Mode().Perm(), c.perm)
		}
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Fatalf("temporary files left: %v", ents)
	}
	// A directory that does not exist: an error naming the path, nothing written.
	bad := filepath.Join(dir, "missing", "f")
	if err := Write(bad, []byte("x"), 0o644); err == nil {
		t.Fatal("write into a missing directory succeeded")
	}
	// The target is a directory: the rename fails and the temporary file is removed.
	sub := filepath.Join(dir, "sub")
	if err := os.MkdirAll(filepath.Join(sub, "d"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := Write(filepath.Join(sub, "d"), []byte("x"), 0o644); err == nil {
		t.Fatal("write over a non-empty directory succeeded")
	}
	if ents, _ := os.ReadDir(sub); len(ents) != 1 {
		t.Fatalf("temporary file left after a failed rename: %v", ents)
	}
}
