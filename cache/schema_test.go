package cache

import (
	"encoding/json"
	"os"
	"strings"
	"testing"

	"linearpatch/shards"
)

// TestSchemaManifestExample: the manifest example of shards/SCHEMA.md parses as a Manifest
// and names its files as the writer does.
func TestSchemaManifestExample(t *testing.T) {
	b, err := os.ReadFile("../shards/SCHEMA.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(b), "### Manifest")
	if !ok {
		t.Fatal("SCHEMA.md has no Manifest section")
	}
	_, rest, ok = strings.Cut(rest, "```json\n")
	example, _, ok2 := strings.Cut(rest, "```")
	if !ok || !ok2 {
		t.Fatal("the Manifest section has no JSON example")
	}
	var m shards.Manifest
	if err := json.Unmarshal([]byte(example), &m); err != nil {
		t.Fatalf("the example is not a manifest: %v\n%s", err, example)
	}
	if len(m.Shards) == 0 {
		t.Fatal("the example lists no shard")
	}
	for _, e := range m.Shards {
		if want := ShardFileName(e.Shard); e.File != want {
			t.Errorf("the example names shard %d's file %q; the writer writes %q", e.Shard, e.File, want)
		}
	}
}
