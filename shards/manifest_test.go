package shards

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestManifest(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "manifest.json")
	sum := strings.Repeat("ab", 32)
	m := &Manifest{Meta: testMeta(Float16, 8, 4, 100, false)}
	for _, s := range []int{3, 1, 2} {
		if err := m.Add(ManifestEntry{Shard: s, Split: SplitTrain, File: "train/s.arrow", Rows: 4, Windows: 2, Tokens: 100, Bytes: 1000, SHA256: sum}); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.Add(ManifestEntry{Shard: 2, Split: SplitValid, File: "v.arrow", SHA256: sum}); err != nil {
		t.Fatal(err)
	}
	if len(m.Shards) != 3 || m.Shards[0].Shard != 1 || m.Shards[2].Shard != 3 {
		t.Fatalf("shards %+v", m.Shards)
	}
	if e, ok := m.Entry(2); !ok || e.Split != SplitValid {
		t.Fatalf("entry 2: %+v %v", e, ok)
	}
	if _, ok := m.Entry(7); ok {
		t.Fatal("entry 7 found")
	}
	if err := m.Save(path); err != nil {
		t.Fatal(err)
	}
	got, err := LoadManifest(path)
	if err != nil {
		t.Fatal(err)
	}
	if got.Meta != m.Meta || len(got.Shards) != 3 || got.Shards[1] != m.Shards[1] {
		t.Fatalf("loaded %+v", got)
	}
	if e, _ := got.Entry(1); e.Path(dir) != filepath.Join(dir, "train", "s.arrow") {
		t.Fatalf("path %s", e.Path(dir))
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Fatalf("directory holds %v", entries)
	}

	bad := []ManifestEntry{
		{Shard: -1, Split: SplitTrain, File: "a", SHA256: sum},
		{Shard: 1, Split: "test", File: "a", SHA256: sum},
		{Shard: 1, Split: SplitTrain, File: "../a", SHA256: sum},
		{Shard: 1, Split: SplitTrain, File: "/abs", SHA256: sum},
		{Shard: 1, Split: SplitTrain, File: "a", SHA256: strings.ToUpper(sum)},
		{Shard: 1, Split: SplitTrain, File: "a", SHA256: "abc"},
		{Shard: 1, Split: SplitTrain, File: "a", Rows: -1, SHA256: sum},
	}
	for _, e := range bad {
		if err := m.Add(e); !errors.Is(err, ErrManifest) {
			t.Errorf("%+v: %v", e, err)
		}
	}
	for name, text := range map[string]string{
		"garbage":   "{not json",
		"duplicate": `{"shards":[{"shard":1,"split":"train","file":"a","sha256":"` + sum + `"},{"shard":1,"split":"train","file":"b","sha256":"` + sum + `"}]}`,
	} {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(text), 0o644)
		if _, err := LoadManifest(p); !errors.Is(err, ErrManifest) {
			t.Errorf("%s: %v", name, err)
		}
	}
}
