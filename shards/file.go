package shards

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/apache/arrow/go/v17/arrow/ipc"
)

// Compression is the buffer compression of a shard file.
type Compression string

const (
	CompressZstd Compression = "zstd" // the default: the top-k columns need its entropy coding
	CompressLZ4  Compression = "lz4"  // LZ4 frame
	CompressNone Compression = "none"
)

// ParseCompression returns the Compression named s ("" gives CompressZstd).
func ParseCompression(s string) (Compression, error) {
	switch c := Compression(s); c {
	case "":
		return CompressZstd, nil
	case CompressZstd, CompressLZ4, CompressNone:
		return c, nil
	}
	return "", fmt.Errorf("%w: compression %q (want zstd, lz4 or none)", ErrInvalid, s)
}

// minSpaceSavings: a buffer is stored compressed only when that saves at least this
// fraction of it (Arrow ≥ 12 readers understand the mixed layout).
const minSpaceSavings = 0.01

func (c Compression) options() ([]ipc.Option, error) {
	switch c {
	case CompressZstd, "":
		return []ipc.Option{ipc.WithZstd(), ipc.WithMinSpaceSavings(minSpaceSavings)}, nil
	case CompressLZ4:
		return []ipc.Option{ipc.WithLZ4(), ipc.WithMinSpaceSavings(minSpaceSavings)}, nil
	case CompressNone:
		return nil, nil
	}
	return nil, fmt.Errorf("%w: compression %q (want zstd, lz4 or none)", ErrInvalid, c)
}

// FileInfo describes a shard file written by WriteShardFile.
type FileInfo struct {
	Path    string
	Rows    int    // rows, one per (window, chunk)
	Windows int    // distinct windows
	Tokens  int    // tokens over all rows
	Bytes   int64  // file size
	SHA256  string // lowercase hex SHA-256 of the file
}

// Entry returns the manifest entry of the file: File is the base name of Path.
func (fi FileInfo) Entry(shard int, split string) ManifestEntry {
	return ManifestEntry{Shard: shard, Split: split, File: filepath.Base(fi.Path), Rows: fi.Rows,
		Windows: fi.Windows, Tokens: fi.Tokens, Bytes: fi.Bytes, SHA256: fi.SHA256}
}

// WriteShardFile writes rows as an Arrow IPC file (schema metadata = meta, one record
// batch per row, buffers compressed with comp) at path. rows must all belong to one shard
// and be in strictly ascending (window, chunk) order, each fitting meta. The write is
// atomic: the file is written to a temporary file in path's directory, synced, and renamed
// over path (then the directory is synced); on error path is untouched and the temporary
// file removed. Errors wrap ErrInvalid or ErrOverflow for rows EncodeMessage would reject
// too, or are I/O errors.
func WriteShardFile(path string, meta Meta, rows []Chunk, comp Compression) (FileInfo, error) {
	opts, err := comp.options()
	if err != nil {
		return FileInfo{}, err
	}
	if err := meta.Validate(); err != nil {
		return FileInfo{}, err
	}
	meta.SchemaVersion = SchemaVersion
	info := FileInfo{Path: path, Rows: len(rows)}
	for i := range rows {
		c := &rows[i]
		if err := checkChunk(meta, c); err != nil {
			return FileInfo{}, err
		}
		if i > 0 {
			p := &rows[i-1]
			if c.Shard != p.Shard || c.Window < p.Window || (c.Window == p.Window && c.Chunk <= p.Chunk) {
				return FileInfo{}, fmt.Errorf("%w: shard file rows must be of one shard in ascending (window, chunk) order: (%d, %d, %d) follows (%d, %d, %d)",
					ErrInvalid, c.Shard, c.Window, c.Chunk, p.Shard, p.Window, p.Chunk)
			}
		}
		if i == 0 || c.Window != rows[i-1].Window {
			info.Windows++
		}
		info.Tokens += c.Tokens()
	}
	schema := chunkSchema(meta)
	info.Bytes, info.SHA256, err = writeAtomic(path, func(w io.WriteSeeker) error {
		fw, err := ipc.NewFileWriter(w, append(opts, ipc.WithSchema(schema))...)
		if err != nil {
			return err
		}
		for i := range rows {
			rec, err := chunkRecord(meta, schema, rows[i:i+1])
			if err != nil {
				fw.Close()
				return err
			}
			err = fw.Write(rec)
			rec.Release()
			if err != nil {
				fw.Close()
				return err
			}
		}
		return fw.Close()
	})
	if err != nil {
		return FileInfo{}, err
	}
	return info, nil
}

// hashingWriter counts and hashes what it writes to a buffered file, and answers the one
// Seek the Arrow file writer makes (its current position).
type hashingWriter struct {
	w *bufio.Writer
	h hash.Hash
	n int64
}

func (h *hashingWriter) Write(p []byte) (int, error) {
	n, err := h.w.Write(p)
	h.h.Write(p[:n])
	h.n += int64(n)
	return n, err
}

func (h *hashingWriter) Seek(offset int64, whence int) (int64, error) {
	if offset == 0 && whence == io.SeekCurrent {
		return h.n, nil
	}
	return 0, errors.New("shards: hashingWriter only reports its position")
}

// writeAtomic writes a file at path with write through a temporary file in the same
// directory (synced, renamed over path, directory synced), returning its size and
// SHA-256. On error the temporary file is removed and path untouched.
func writeAtomic(path string, write func(io.WriteSeeker) error) (size int64, sum string, err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return 0, "", fmt.Errorf("shards: write %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	hw := &hashingWriter{w: bufio.NewWriterSize(f, 1<<20), h: sha256.New()}
	if err = write(hw); err != nil {
		return 0, "", fmt.Errorf("shards: write %s: %w", path, err)
	}
	if err = hw.w.Flush(); err != nil {
		return 0, "", fmt.Errorf("shards: write %s: %w", path, err)
	}
	if err = f.Chmod(0o644); err != nil {
		return 0, "", fmt.Errorf("shards: write %s: %w", path, err)
	}
	if err = f.Sync(); err != nil {
		return 0, "", fmt.Errorf("shards: sync %s: %w", path, err)
	}
	if err = f.Close(); err != nil {
		return 0, "", fmt.Errorf("shards: close %s: %w", path, err)
	}
	if err = os.Rename(tmp, path); err != nil {
		return 0, "", fmt.Errorf("shards: rename into %s: %w", path, err)
	}
	if d, derr := os.Open(dir); derr == nil { // make the rename durable; best effort
		d.Sync()
		d.Close()
	}
	return hw.n, hex.EncodeToString(hw.h.Sum(nil)), nil
}

// FileSHA256 returns the lowercase hex SHA-256 of the file at path.
func FileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("shards: checksum: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("shards: checksum %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// ShardReader reads the rows of a shard file one at a time. It holds the file's
// (compressed) bytes in memory, so it is immune to the file changing after the checksum.
// It is not safe for concurrent use.
type ShardReader struct {
	meta Meta
	fr   *ipc.FileReader
}

// OpenShardFile reads the shard file at path, checks its SHA-256 against expectSHA256
// (lowercase or uppercase hex; an empty expectation is an error) before decoding anything,
// and checks its Meta against want. Errors wrap ErrChecksum (the file must be refetched,
// never trained on), ErrVersion, ErrForeign, ErrCorrupt or ErrInvalid, or are I/O errors.
func OpenShardFile(path string, want Meta, expectSHA256 string) (r *ShardReader, err error) {
	if err := want.Validate(); err != nil {
		return nil, err
	}
	if expectSHA256 == "" {
		return nil, fmt.Errorf("%w: open %s without an expected checksum", ErrInvalid, path)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("shards: open shard: %w", err)
	}
	sum := sha256.Sum256(b)
	if got := hex.EncodeToString(sum[:]); got != strings.ToLower(expectSHA256) {
		return nil, fmt.Errorf("%w: %s has sha256 %s, expected %s", ErrChecksum, path, got, expectSHA256)
	}
	defer recoverCorrupt(&err)
	// The file reader sizes its buffers by the lengths in the footer and the record
	// metadata: an allocation limit keeps a corrupt length from exhausting memory (the
	// SHA-256 only says the file is the one the manifest names, not that it is sound).
	fr, err := ipc.NewFileReader(bytes.NewReader(b), ipc.WithAllocator(newLimitAlloc(fileDecodeLimit(len(b)))))
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, path, err)
	}
	meta, err := checkSchema(fr.Schema(), want, kindChunks)
	if err != nil {
		fr.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &ShardReader{meta: meta, fr: fr}, nil
}

// Meta returns the file's Meta.
func (r *ShardReader) Meta() Meta { return r.meta }

// Rows returns the number of rows (record batches) in the file.
func (r *ShardReader) Rows() int { return r.fr.NumRecords() }

// Row decodes row i (0 ≤ i < Rows(); otherwise an error wrapping ErrInvalid) into a newly
// allocated Chunk. A record batch holding other than one row is ErrCorrupt.
func (r *ShardReader) Row(i int) (c Chunk, err error) {
	if i < 0 || i >= r.Rows() {
		return Chunk{}, fmt.Errorf("%w: row %d of %d", ErrInvalid, i, r.Rows())
	}
	defer recoverCorrupt(&err)
	rec, err := r.fr.RecordAt(i)
	if err != nil {
		return Chunk{}, fmt.Errorf("%w: row %d: %v", ErrCorrupt, i, err)
	}
	defer rec.Release()
	if rec.NumRows() != 1 {
		return Chunk{}, fmt.Errorf("%w: record batch %d holds %d rows", ErrCorrupt, i, rec.NumRows())
	}
	rows, err := decodeChunks(r.meta, rec, i, nil)
	if err != nil {
		return Chunk{}, err
	}
	return rows[0], nil
}

// Close releases the reader.
func (r *ShardReader) Close() error { return r.fr.Close() }

// ReadShardFile is OpenShardFile followed by reading every row, in file order. It also
// checks that the rows are of one shard in ascending (window, chunk) order (ErrCorrupt).
func ReadShardFile(path string, want Meta, expectSHA256 string) ([]Chunk, error) {
	r, err := OpenShardFile(path, want, expectSHA256)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	rows := make([]Chunk, 0, r.Rows())
	for i := range r.Rows() {
		c, err := r.Row(i)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		if i > 0 {
			p := &rows[i-1]
			if c.Shard != p.Shard || c.Window < p.Window || (c.Window == p.Window && c.Chunk <= p.Chunk) {
				return nil, fmt.Errorf("%w: %s: row %d (%d, %d, %d) out of order after (%d, %d, %d)", ErrCorrupt, path, i, c.Shard, c.Window, c.Chunk, p.Shard, p.Window, p.Chunk)
			}
		}
		rows = append(rows, c)
	}
	return rows, nil
}

// fileDecodeLimit is the allocation limit for reading a shard file of n bytes: one row is
// decoded at a time, but a compressed file may expand more than a message, so the limit is
// looser than decodeLimit while still refusing what no file of that size can hold.
func fileDecodeLimit(n int) int { return 64*n + 64<<20 }
