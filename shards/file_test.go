package shards

import (
	"errors"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func TestShardFileRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(20, 20))
	dir := t.TempDir()
	for _, comp := range []Compression{CompressZstd, CompressLZ4, CompressNone} {
		for _, dt := range []DType{Float16, BFloat16, Float32} {
			m := testMeta(dt, 16, 6, 2000, dt == BFloat16)
			var rows []Chunk
			for w := 10; w < 13; w++ {
				rows = append(rows, SplitWindow(m, randWindow(r, m, 4, w, 20), 7)...)
			}
			path := filepath.Join(dir, string(comp)+"-"+string(dt)+".arrow")
			fi, err := WriteShardFile(path, m, rows, comp)
			if err != nil {
				t.Fatal(err)
			}
			st, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			sum, err := FileSHA256(path)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Rows != 9 || fi.Windows != 3 || fi.Tokens != 60 || fi.Bytes != st.Size() || fi.SHA256 != sum || fi.Path != path {
				t.Fatalf("%s/%s: FileInfo %+v (size %d, sha %s)", comp, dt, fi, st.Size(), sum)
			}
			got, err := ReadShardFile(path, m, fi.SHA256)
			if err != nil {
				t.Fatal(err)
			}
			equalRows(t, m, got, rows, 1e-3)
			sr, err := OpenShardFile(path, m, fi.SHA256)
			if err != nil {
				t.Fatal(err)
			}
			if sr.Rows() != 9 {
				t.Fatalf("%d rows", sr.Rows())
			}
			row, err := sr.Row(4)
			if err != nil {
				t.Fatal(err)
			}
			equalRows(t, m, []Chunk{row}, rows[4:5], 1e-3)
			if _, err := sr.Row(9); !errors.Is(err, ErrInvalid) {
				t.Fatalf("row 9: %v", err)
			}
			sr.Close()
		}
	}
}

func TestShardFileChecksumAndMeta(t *testing.T) {
	r := rand.New(rand.NewPCG(21, 21))
	dir := t.TempDir()
	m := testMeta(Float16, 8, 4, 100, false)
	rows := []Chunk{randWindow(r, m, 0, 0, 10), randWindow(r, m, 0, 1, 10)}
	path := filepath.Join(dir, "s.arrow")
	fi, err := WriteShardFile(path, m, rows, CompressZstd)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ReadShardFile(path, m, fi.SHA256[:63]+"0"); !errors.Is(err, ErrChecksum) {
		t.Errorf("wrong expected sum: %v", err)
	}
	if _, err := ReadShardFile(path, m, ""); !errors.Is(err, ErrInvalid) {
		t.Errorf("no expected sum: %v", err)
	}
	b, _ := os.ReadFile(path)
	b[len(b)/2] ^= 1
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadShardFile(path, m, fi.SHA256); !errors.Is(err, ErrChecksum) {
		t.Errorf("flipped byte: %v", err)
	}
	// A file that matches its (recomputed) checksum but belongs to another run.
	b[len(b)/2] ^= 1
	os.WriteFile(path, b, 0o644)
	other := m
	other.Fingerprint = "another model"
	if _, err := ReadShardFile(path, other, fi.SHA256); !errors.Is(err, ErrForeign) {
		t.Errorf("foreign: %v", err)
	}
	if _, err := ReadShardFile(filepath.Join(dir, "missing"), m, fi.SHA256); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing: %v", err)
	}
}

func TestWriteShardFileAtomic(t *testing.T) {
	r := rand.New(rand.NewPCG(22, 22))
	dir := t.TempDir()
	m := testMeta(Float16, 8, 4, 100, false)
	rows := []Chunk{randWindow(r, m, 0, 0, 10), randWindow(r, m, 0, 1, 10), randWindow(r, m, 0, 2, 10)}
	path := filepath.Join(dir, "s.arrow")
	if err := os.WriteFile(path, []byte("previous"), 0o644); err != nil {
		t.Fatal(err)
	}
	// The last row overflows float16: the error comes mid-write.
	bad := slices.Clone(rows)
	bad[2].XCut = slices.Clone(bad[2].XCut)
	bad[2].XCut[3] = 1e6
	if _, err := WriteShardFile(path, m, bad, CompressZstd); !errors.Is(err, ErrOverflow) {
		t.Fatalf("overflow: %v", err)
	}
	// Out of order and mixed shards are refused before writing.
	if _, err := WriteShardFile(path, m, []Chunk{rows[1], rows[0]}, CompressZstd); !errors.Is(err, ErrInvalid) {
		t.Fatalf("out of order: %v", err)
	}
	other := rows[1]
	other.Shard = 1
	if _, err := WriteShardFile(path, m, []Chunk{rows[0], other}, CompressZstd); !errors.Is(err, ErrInvalid) {
		t.Fatalf("two shards: %v", err)
	}
	if _, err := WriteShardFile(path, m, rows, "brotli"); !errors.Is(err, ErrInvalid) {
		t.Fatalf("unknown compression: %v", err)
	}
	if _, err := WriteShardFile(filepath.Join(dir, "nodir", "s.arrow"), m, rows, CompressZstd); err == nil {
		t.Fatal("write into a missing directory succeeded")
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 || entries[0].Name() != "s.arrow" {
		t.Fatalf("directory holds %v, want only s.arrow", entries)
	}
	if b, _ := os.ReadFile(path); string(b) != "previous" {
		t.Fatalf("failed writes changed the file: %q", b)
	}
	if _, err := WriteShardFile(path, m, rows, CompressZstd); err != nil {
		t.Fatal(err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Fatalf("directory holds %v after a good write", entries)
	}
}

func TestParseNames(t *testing.T) {
	for in, want := range map[string]Compression{"": CompressZstd, "zstd": CompressZstd, "lz4": CompressLZ4, "none": CompressNone} {
		if got, err := ParseCompression(in); err != nil || got != want {
			t.Errorf("ParseCompression(%q) = %q, %v", in, got, err)
		}
	}
	if _, err := ParseCompression("gzip"); !errors.Is(err, ErrInvalid) {
		t.Errorf("gzip: %v", err)
	}
	for in, want := range map[string]DType{"": Float16, "float16": Float16, "bfloat16": BFloat16, "float32": Float32} {
		if got, err := ParseDType(in); err != nil || got != want {
			t.Errorf("ParseDType(%q) = %q, %v", in, got, err)
		}
	}
	if _, err := ParseDType("fp8"); !errors.Is(err, ErrInvalid) {
		t.Errorf("fp8: %v", err)
	}
}

func TestAssembler(t *testing.T) {
	r := rand.New(rand.NewPCG(23, 23))
	m := testMeta(Float16, 8, 3, 100, false)
	var all []Chunk
	for _, w := range []int{5, 6, 9} {
		all = append(all, SplitWindow(m, randWindow(r, m, 2, w, 10), 4)...)
	}
	a := NewAssembler(m, 2, []int{5, 6, 9})
	// Deliver everything twice, shuffled: at least once.
	deliveries := append(slices.Clone(all), all...)
	r.Shuffle(len(deliveries), func(i, j int) { deliveries[i], deliveries[j] = deliveries[j], deliveries[i] })
	added := 0
	for i, c := range deliveries {
		if a.Complete() && i < len(all) {
			t.Fatal("complete too early")
		}
		ok, err := a.Add(c)
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			added++
		}
	}
	if added != len(all) || !a.Complete() {
		t.Fatalf("added %d of %d, complete %v", added, len(all), a.Complete())
	}
	if !chunksIdentical(a.Rows(), all) {
		t.Fatal("assembled rows differ from the originals")
	}
	foreign := all[0]
	foreign.Shard = 3
	if _, err := a.Add(foreign); !errors.Is(err, ErrForeign) {
		t.Errorf("other shard: %v", err)
	}
	foreign = all[0]
	foreign.Window = 7
	if _, err := a.Add(foreign); !errors.Is(err, ErrForeign) {
		t.Errorf("other window: %v", err)
	}
	b := NewAssembler(m, 2, []int{5})
	c := all[0]
	b.Add(c)
	c.Chunk, c.Chunks = 1, 5
	if _, err := b.Add(c); !errors.Is(err, ErrCorrupt) {
		t.Errorf("chunk count disagreement: %v", err)
	}
	if _, err := b.WriteFile(filepath.Join(t.TempDir(), "x"), CompressZstd); !errors.Is(err, ErrInvalid) {
		t.Errorf("incomplete write: %v", err)
	}
	fi, err := a.WriteFile(filepath.Join(t.TempDir(), "s.arrow"), CompressZstd)
	if err != nil || fi.Rows != len(all) || fi.Windows != 3 || fi.Tokens != 30 {
		t.Fatalf("%+v, %v", fi, err)
	}
}
