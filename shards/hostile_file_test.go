package shards

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// writeTestShard writes rows of one window each (T tokens) uncompressed and returns the
// path, the file's bytes and the rows.
func writeTestShard(t *testing.T, m Meta, windows, T int) (string, []byte, []Chunk) {
	t.Helper()
	r := rand.New(rand.NewPCG(3, 3))
	var rows []Chunk
	for w := range windows {
		rows = append(rows, randWindow(r, m, 4, w, T))
	}
	path := filepath.Join(t.TempDir(), "train-00004.arrow")
	if _, err := WriteShardFile(path, m, rows, CompressNone); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return path, b, rows
}

// rewrite writes b to path and returns its SHA-256, as a manifest matching the bad file would.
func rewrite(t *testing.T, path string, b []byte) string {
	t.Helper()
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// TestShardFileHugeBufferLength: a record whose metadata claims a buffer of 2^47 bytes (140 TB)
// (the manifest's SHA-256 matching the bad file) is ErrCorrupt, not a fatal out-of-memory
// in the Arrow file reader.
func TestShardFileHugeBufferLength(t *testing.T) {
	m := testMeta(Float32, 16, 6, 2000, false)
	const T = 20
	path, b, _ := writeTestShard(t, m, 3, T)
	// The x_cut values buffer of a row is T·dim·4 = 1280 bytes; its Buffer struct in the
	// record metadata is (offset, length) as two little-endian int64.
	var want [8]byte
	binary.LittleEndian.PutUint64(want[:], T*16*4)
	patched := 0
	for i := 8; i+8 <= len(b); i += 8 {
		if !bytes.Equal(b[i:i+8], want[:]) {
			continue
		}
		if off := binary.LittleEndian.Uint64(b[i-8:]); off%8 != 0 || off > uint64(len(b)) {
			continue
		}
		binary.LittleEndian.PutUint64(b[i:], 1<<47)
		patched++
	}
	if patched == 0 {
		t.Fatal("found no x_cut buffer length to corrupt: the test would test nothing")
	}
	sum := rewrite(t, path, b)
	_, err := ReadShardFile(path, m, sum)
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("ReadShardFile of a file claiming a 2^47-byte buffer: %v, want ErrCorrupt", err)
	}
}

// TestShardFileCRCNamesTheRow: a CRC mismatch names the row of the file it is in, not the
// row within its one-row record batch (always 0).
func TestShardFileCRCNamesTheRow(t *testing.T) {
	m := testMeta(Float32, 16, 6, 2000, false)
	path, b, rows := writeTestShard(t, m, 4, 20)
	var pat [8]byte
	binary.LittleEndian.PutUint32(pat[:], math.Float32bits(rows[2].XCut[0]))
	binary.LittleEndian.PutUint32(pat[4:], math.Float32bits(rows[2].XCut[1]))
	i := bytes.Index(b, pat[:])
	if i < 0 || bytes.Index(b[i+1:], pat[:]) >= 0 {
		t.Fatal("row 2's first activations are not found exactly once in the file")
	}
	b[i] ^= 1 // lowest mantissa bit: still finite, only the CRC can tell
	sum := rewrite(t, path, b)
	_, err := ReadShardFile(path, m, sum)
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "row 2 ") {
		t.Fatalf("ReadShardFile with row 2 corrupted: %v, want ErrCorrupt naming row 2", err)
	}
}
