package shards

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
)

// Splits of a manifest entry.
const (
	SplitTrain = "train" // distillation windows
	SplitValid = "valid" // held-out windows
	SplitStats = "stats" // calibration windows of the statistics phase
)

// ManifestEntry lists one shard file.
type ManifestEntry struct {
	Shard   int    `json:"shard"` // unique within a manifest
	Split   string `json:"split"` // SplitTrain, SplitValid or SplitStats
	File    string `json:"file"`  // path relative to the manifest's directory, slash-separated
	Rows    int    `json:"rows"`
	Windows int    `json:"windows"`
	Tokens  int    `json:"tokens"`
	Bytes   int64  `json:"bytes"`
	SHA256  string `json:"sha256"` // lowercase hex
}

// Manifest lists a run's shard files; Shards is kept sorted by Shard.
type Manifest struct {
	Meta   Meta            `json:"meta"`
	Shards []ManifestEntry `json:"shards"`
}

// Validate checks the entries: unique non-negative shards, a known split, a local relative
// file path, non-negative counts and a 64-digit lowercase hex SHA-256. Errors wrap ErrManifest.
func (m *Manifest) Validate() error {
	seen := map[int]bool{}
	for _, e := range m.Shards {
		if err := e.validate(); err != nil {
			return err
		}
		if seen[e.Shard] {
			return fmt.Errorf("%w: shard %d listed twice", ErrManifest, e.Shard)
		}
		seen[e.Shard] = true
	}
	return nil
}

func (e ManifestEntry) validate() error {
	bad := func(what string) error { return fmt.Errorf("%w: shard %d: %s", ErrManifest, e.Shard, what) }
	switch {
	case e.Shard < 0:
		return bad("negative shard number")
	case e.Split != SplitTrain && e.Split != SplitValid && e.Split != SplitStats:
		return bad(fmt.Sprintf("split %q (want train, valid or stats)", e.Split))
	case e.File == "" || !filepath.IsLocal(filepath.FromSlash(e.File)):
		return bad(fmt.Sprintf("file %q is not a local relative path", e.File))
	case e.Rows < 0 || e.Windows < 0 || e.Tokens < 0 || e.Bytes < 0:
		return bad("negative count")
	}
	if b, err := hex.DecodeString(e.SHA256); err != nil || len(b) != 32 || e.SHA256 != hex.EncodeToString(b) {
		return bad(fmt.Sprintf("sha256 %q is not 64 lowercase hex digits", e.SHA256))
	}
	return nil
}

// Add inserts e, replacing the entry of the same shard. It returns an error wrapping
// ErrManifest, leaving m unchanged, when e is malformed.
func (m *Manifest) Add(e ManifestEntry) error {
	if err := e.validate(); err != nil {
		return err
	}
	i, found := slices.BinarySearchFunc(m.Shards, e.Shard, func(x ManifestEntry, s int) int { return x.Shard - s })
	if found {
		m.Shards[i] = e
	} else {
		m.Shards = slices.Insert(m.Shards, i, e)
	}
	return nil
}

// Entry returns the entry of shard and whether there is one.
func (m *Manifest) Entry(shard int) (ManifestEntry, bool) {
	i, found := slices.BinarySearchFunc(m.Shards, shard, func(x ManifestEntry, s int) int { return x.Shard - s })
	if !found {
		return ManifestEntry{}, false
	}
	return m.Shards[i], true
}

// Path returns the path of e's file for a manifest stored in dir.
func (e ManifestEntry) Path(dir string) string { return filepath.Join(dir, filepath.FromSlash(e.File)) }

// Save writes m as indented JSON at path, atomically (temporary file in the same
// directory, synced, renamed). Errors wrap ErrManifest for an invalid m, or are I/O errors.
func (m *Manifest) Save(path string) error {
	if err := m.Validate(); err != nil {
		return err
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return fmt.Errorf("shards: save manifest: %w", err)
	}
	b = append(b, '\n')
	_, _, err = writeAtomic(path, func(w io.WriteSeeker) error {
		_, err := w.Write(b)
		return err
	})
	return err
}

// LoadManifest reads the manifest at path. Entries are sorted by shard. Errors wrap
// ErrManifest for malformed JSON or entries, or are I/O errors (errors.Is(err,
// fs.ErrNotExist) for a missing file).
func LoadManifest(path string) (*Manifest, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("shards: load manifest: %w", err)
	}
	var m Manifest
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrManifest, path, err)
	}
	if err := m.Validate(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	slices.SortFunc(m.Shards, func(a, b ManifestEntry) int { return a.Shard - b.Shard })
	return &m, nil
}
