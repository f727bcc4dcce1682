package shards

import (
	"cmp"
	"fmt"
	"slices"
)

// Assembler collects the rows of one shard as the cache writer receives them (at least
// once, in any order), dropping duplicates by (shard, window, chunk), until every chunk of
// every expected window is present. It is not safe for concurrent use.
type Assembler struct {
	meta    Meta
	shard   int
	windows map[int]int // expected window → its Chunks (0 until a row arrives)
	rows    map[ChunkKey]Chunk
	missing int // windows without any row yet
}

// NewAssembler returns an assembler for shard, expecting rows of exactly the given windows
// (repeats ignored), each row fitting meta.
func NewAssembler(meta Meta, shard int, windows []int) *Assembler {
	a := &Assembler{meta: meta, shard: shard, windows: map[int]int{}, rows: map[ChunkKey]Chunk{}}
	for _, w := range windows {
		a.windows[w] = 0
	}
	a.missing = len(a.windows)
	return a
}

// Add takes in c, returning false (and no error) when a row with c's key is already held.
// The assembler keeps c (and its slices). Errors wrap ErrForeign (another shard, or a
// window not expected), ErrCorrupt (a Chunks count that differs from the window's earlier
// rows) or ErrInvalid (c does not fit the Meta); the assembler is then unchanged.
func (a *Assembler) Add(c Chunk) (bool, error) {
	if c.Shard != a.shard {
		return false, fmt.Errorf("%w: row of shard %d, assembling shard %d", ErrForeign, c.Shard, a.shard)
	}
	n, ok := a.windows[c.Window]
	if !ok {
		return false, fmt.Errorf("%w: window %d is not in shard %d", ErrForeign, c.Window, a.shard)
	}
	if _, dup := a.rows[c.Key()]; dup {
		return false, nil
	}
	if err := checkChunk(a.meta, &c); err != nil {
		return false, err
	}
	if n != 0 && n != c.Chunks {
		return false, fmt.Errorf("%w: window %d split into %d chunks, earlier rows say %d", ErrCorrupt, c.Window, c.Chunks, n)
	}
	if n == 0 {
		a.windows[c.Window] = c.Chunks
		a.missing--
	}
	a.rows[c.Key()] = c
	return true, nil
}

// Complete reports whether every chunk of every expected window is held.
func (a *Assembler) Complete() bool {
	if a.missing > 0 {
		return false
	}
	want := 0
	for _, n := range a.windows {
		want += n
	}
	return len(a.rows) == want
}

// Rows returns the rows held, sorted by (window, chunk); the Chunks are shared with the
// assembler.
func (a *Assembler) Rows() []Chunk {
	out := make([]Chunk, 0, len(a.rows))
	for _, c := range a.rows {
		out = append(out, c)
	}
	slices.SortFunc(out, func(x, y Chunk) int {
		return cmp.Or(cmp.Compare(x.Window, y.Window), cmp.Compare(x.Chunk, y.Chunk))
	})
	return out
}

// WriteFile writes the complete shard with WriteShardFile. An incomplete shard is an
// error wrapping ErrInvalid.
func (a *Assembler) WriteFile(path string, comp Compression) (FileInfo, error) {
	if !a.Complete() {
		return FileInfo{}, fmt.Errorf("%w: shard %d is incomplete (%d rows held)", ErrInvalid, a.shard, len(a.rows))
	}
	return WriteShardFile(path, a.meta, a.Rows(), comp)
}
