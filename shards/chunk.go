package shards

import (
	"encoding/binary"
	"fmt"
	"math"

	"github.com/apache/arrow/go/v17/arrow"
)

// Chunk is one row of the cache: tokens [TokenLo, TokenLo+Tokens()) of one window.
// Activations are float32 in memory whatever the wire dtype.
type Chunk struct {
	Shard   int // the shard the window belongs to
	Window  int // the window's global index in the token stream
	Chunk   int // this row's index within the window, 0 ≤ Chunk < Chunks
	Chunks  int // the number of rows the window was split into
	TokenLo int // the window position of the row's first token

	InputIDs []int32   // Tokens() token ids
	XCut     []float32 // Tokens()×Dim, the hidden state X_Start entering the cut, row-major
	TopKIdx  []int32   // Tokens()×K, per token by descending probability (ties by ascending id)
	TopKProb []float32 // Tokens()×K teacher probabilities over the top k (each token's K sum to 1)
	XFinal   []float32 // Tokens()×Dim, the last layer's output X_L, when Meta.Final; else nil
}

// Tokens returns the number of tokens in c.
func (c *Chunk) Tokens() int { return len(c.InputIDs) }

// ChunkKey identifies a row; the cache writer drops rows whose key it already holds.
type ChunkKey struct{ Shard, Window, Chunk int }

// Key returns c's deduplication key.
func (c *Chunk) Key() ChunkKey { return ChunkKey{c.Shard, c.Window, c.Chunk} }

// Column names of the chunk schema, in schema order (topk_* only when K > 0, x_final only
// when Final).
const (
	colShard    = "shard"
	colWindow   = "window"
	colChunk    = "chunk"
	colChunks   = "chunks"
	colTokenLo  = "token_lo"
	colInputIDs = "input_ids"
	colXCut     = "x_cut"
	colGapLo    = "topk_gap_lo"
	colGapHi    = "topk_gap_hi"
	colSqrtP    = "topk_sqrtp"
	colXFinal   = "x_final"
)

// chunkSchema returns the Arrow schema of m's chunk records, metadata included.
func chunkSchema(m Meta) *arrow.Schema {
	act := func(name string) arrow.Field {
		return arrow.Field{Name: name, Type: listOf(fslOf(m.Dim, m.ActDType.arrowType())),
			Metadata: arrow.NewMetadata([]string{keyDTypeField}, []string{string(m.ActDType)})}
	}
	fields := []arrow.Field{
		{Name: colShard, Type: arrow.PrimitiveTypes.Int32},
		{Name: colWindow, Type: arrow.PrimitiveTypes.Int64},
		{Name: colChunk, Type: arrow.PrimitiveTypes.Int32},
		{Name: colChunks, Type: arrow.PrimitiveTypes.Int32},
		{Name: colTokenLo, Type: arrow.PrimitiveTypes.Int32},
		{Name: colInputIDs, Type: listOf(arrow.PrimitiveTypes.Int32)},
		act(colXCut),
	}
	if m.K > 0 {
		hi := arrow.DataType(arrow.PrimitiveTypes.Uint8)
		if m.hiWidth() == 2 {
			hi = arrow.PrimitiveTypes.Uint16
		}
		fields = append(fields,
			arrow.Field{Name: colGapLo, Type: listOf(fslOf(m.K, arrow.PrimitiveTypes.Uint8))},
			arrow.Field{Name: colGapHi, Type: listOf(fslOf(m.K, hi))},
			arrow.Field{Name: colSqrtP, Type: listOf(fslOf(m.K, arrow.PrimitiveTypes.Uint8))},
		)
	}
	if m.Final {
		fields = append(fields, act(colXFinal))
	}
	md := m.metadata(kindChunks)
	return arrow.NewSchema(fields, &md)
}

// checkChunk validates row c against m. Errors wrap ErrInvalid.
func checkChunk(m Meta, c *Chunk) error {
	T := c.Tokens()
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: row (shard %d, window %d, chunk %d): %s", ErrInvalid, c.Shard, c.Window, c.Chunk, fmt.Sprintf(format, a...))
	}
	switch {
	case T < 1:
		return bad("no tokens")
	case c.Shard < 0 || c.Shard > math.MaxInt32 || c.Window < 0 || c.Chunks < 1 || c.Chunks > math.MaxInt32 ||
		c.Chunk < 0 || c.Chunk >= c.Chunks || c.TokenLo < 0 || c.TokenLo+T > math.MaxInt32:
		return bad("invalid position (chunks %d, token_lo %d)", c.Chunks, c.TokenLo)
	case len(c.XCut) != T*m.Dim:
		return bad("%d x_cut values, want %d tokens × %d", len(c.XCut), T, m.Dim)
	case len(c.TopKIdx) != T*m.K || len(c.TopKProb) != T*m.K:
		return bad("%d top-k ids and %d probabilities, want %d tokens × %d", len(c.TopKIdx), len(c.TopKProb), T, m.K)
	case m.Final && len(c.XFinal) != T*m.Dim:
		return bad("%d x_final values, want %d tokens × %d", len(c.XFinal), T, m.Dim)
	case !m.Final && len(c.XFinal) != 0:
		return bad("x_final given but the meta has no final-layer columns")
	}
	for _, id := range c.InputIDs {
		if id < 0 || int(id) >= m.Vocab {
			return bad("input id %d outside the vocabulary [0, %d)", id, m.Vocab)
		}
	}
	return nil
}

// chunkRecord builds the record of rows (validated by checkChunk) under schema.
func chunkRecord(m Meta, schema *arrow.Schema, rows []Chunk) (arrow.Record, error) {
	R := len(rows)
	offs := make([]int32, R+1)
	for r := range rows {
		offs[r+1] = offs[r] + int32(rows[r].Tokens())
	}
	total := int(offs[R])
	shard, window := make([]byte, 4*R), make([]byte, 8*R)
	chunk, chunks, tokenLo := make([]byte, 4*R), make([]byte, 4*R), make([]byte, 4*R)
	ids := make([]byte, 4*total)
	aw := m.ActDType.Size()
	xcut := make([]byte, total*m.Dim*aw)
	var xfin []byte
	if m.Final {
		xfin = make([]byte, total*m.Dim*aw)
	}
	hiW := m.hiWidth()
	lo, hi, sq := make([]byte, total*m.K), make([]byte, total*m.K*hiW), make([]byte, total*m.K)
	scratch := newTopKScratch(m.K)
	for r := range rows {
		c := &rows[r]
		binary.LittleEndian.PutUint32(shard[4*r:], uint32(c.Shard))
		binary.LittleEndian.PutUint64(window[8*r:], uint64(c.Window))
		binary.LittleEndian.PutUint32(chunk[4*r:], uint32(c.Chunk))
		binary.LittleEndian.PutUint32(chunks[4*r:], uint32(c.Chunks))
		binary.LittleEndian.PutUint32(tokenLo[4*r:], uint32(c.TokenLo))
		t0 := int(offs[r])
		for t, id := range c.InputIDs {
			binary.LittleEndian.PutUint32(ids[4*(t0+t):], uint32(id))
		}
		if err := putActs(m.ActDType, xcut[t0*m.Dim*aw:], c.XCut); err != nil {
			return nil, fmt.Errorf("x_cut of (shard %d, window %d, chunk %d): %w", c.Shard, c.Window, c.Chunk, err)
		}
		if m.Final {
			if err := putActs(m.ActDType, xfin[t0*m.Dim*aw:], c.XFinal); err != nil {
				return nil, fmt.Errorf("x_final of (shard %d, window %d, chunk %d): %w", c.Shard, c.Window, c.Chunk, err)
			}
		}
		K := m.K
		for t := 0; K > 0 && t < c.Tokens(); t++ {
			e := (t0 + t) * K
			if err := encodeTopK(c.TopKIdx[t*K:(t+1)*K], c.TopKProb[t*K:(t+1)*K], m.Vocab, hiW,
				lo[e:e+K], hi[e*hiW:(e+K)*hiW], sq[e:e+K], scratch); err != nil {
				return nil, fmt.Errorf("top-k of (shard %d, window %d, chunk %d) token %d: %w", c.Shard, c.Window, c.Chunk, t, err)
			}
		}
	}
	fields := schema.Fields()
	cols := []arrow.ArrayData{
		primData(fields[0].Type, R, shard),
		primData(fields[1].Type, R, window),
		primData(fields[2].Type, R, chunk),
		primData(fields[3].Type, R, chunks),
		primData(fields[4].Type, R, tokenLo),
		nestedData(fields[5].Type, R, offs, ids),
		nestedData(fields[6].Type, R, offs, xcut),
	}
	next := 7
	if m.K > 0 {
		cols = append(cols,
			nestedData(fields[7].Type, R, offs, lo),
			nestedData(fields[8].Type, R, offs, hi),
			nestedData(fields[9].Type, R, offs, sq))
		next = 10
	}
	if m.Final {
		cols = append(cols, nestedData(fields[next].Type, R, offs, xfin))
	}
	return newRecord(schema, cols, R), nil
}

// decodeChunks appends the rows of rec (whose schema has been checked against m) to out.
// Errors wrap ErrCorrupt.
func decodeChunks(m Meta, rec arrow.Record, out []Chunk) ([]Chunk, error) {
	R := int(rec.NumRows())
	col := func(i int) arrow.ArrayData { return rec.Column(i).Data() }
	for i := range int(rec.NumCols()) {
		if col(i).Len() != R {
			return nil, fmt.Errorf("%w: column %s has %d rows, the record %d", ErrCorrupt, rec.ColumnName(i), col(i).Len(), R)
		}
	}
	var scalars [5][]byte
	widths := [5]int{4, 8, 4, 4, 4}
	for i := range scalars {
		var err error
		if scalars[i], err = colValues(rec.ColumnName(i), col(i), widths[i]); err != nil {
			return nil, err
		}
	}
	type nested struct {
		name string
		offs []int
		vals []byte
	}
	aw, hiW, K, d := m.ActDType.Size(), m.hiWidth(), m.K, m.Dim
	type colSpec struct {
		name string
		w    int // bytes per primitive element
	}
	specs := []colSpec{{colInputIDs, 4}, {colXCut, aw}}
	if K > 0 {
		specs = append(specs, colSpec{colGapLo, 1}, colSpec{colGapHi, hiW}, colSpec{colSqrtP, 1})
	}
	if m.Final {
		specs = append(specs, colSpec{colXFinal, aw})
	}
	cols := make(map[string]nested, len(specs))
	for i, s := range specs {
		offs, vals, err := nestedValues(s.name, col(5+i), s.w)
		if err != nil {
			return nil, err
		}
		cols[s.name] = nested{s.name, offs, vals}
	}
	ids, xcut := cols[colInputIDs], cols[colXCut]
	for r := range R {
		c := Chunk{
			Shard:   int(int32(binary.LittleEndian.Uint32(scalars[0][4*r:]))),
			Window:  int(int64(binary.LittleEndian.Uint64(scalars[1][8*r:]))),
			Chunk:   int(int32(binary.LittleEndian.Uint32(scalars[2][4*r:]))),
			Chunks:  int(int32(binary.LittleEndian.Uint32(scalars[3][4*r:]))),
			TokenLo: int(int32(binary.LittleEndian.Uint32(scalars[4][4*r:]))),
		}
		t0, t1 := ids.offs[r], ids.offs[r+1]
		T := t1 - t0
		if T < 1 {
			return nil, fmt.Errorf("%w: row %d has no tokens", ErrCorrupt, r)
		}
		for _, s := range specs {
			if n := cols[s.name]; n.offs[r] != t0 || n.offs[r+1] != t1 {
				return nil, fmt.Errorf("%w: row %d: column %s spans tokens [%d, %d), input_ids [%d, %d)", ErrCorrupt, r, s.name, n.offs[r], n.offs[r+1], t0, t1)
			}
		}
		if c.Shard < 0 || c.Window < 0 || c.Chunks < 1 || c.Chunk < 0 || c.Chunk >= c.Chunks || c.TokenLo < 0 || c.TokenLo > math.MaxInt32-T {
			return nil, fmt.Errorf("%w: row %d: invalid position (shard %d, window %d, chunk %d of %d, token_lo %d)", ErrCorrupt, r, c.Shard, c.Window, c.Chunk, c.Chunks, c.TokenLo)
		}
		c.InputIDs = make([]int32, T)
		for t := range c.InputIDs {
			id := int32(binary.LittleEndian.Uint32(ids.vals[4*(t0+t):]))
			if id < 0 || int(id) >= m.Vocab {
				return nil, fmt.Errorf("%w: row %d: input id %d outside the vocabulary [0, %d)", ErrCorrupt, r, id, m.Vocab)
			}
			c.InputIDs[t] = id
		}
		c.XCut = make([]float32, T*d)
		if !getActs(m.ActDType, c.XCut, xcut.vals[t0*d*aw:]) {
			return nil, fmt.Errorf("%w: row %d: non-finite x_cut", ErrCorrupt, r)
		}
		if K > 0 {
			lo, hi, sq := cols[colGapLo].vals, cols[colGapHi].vals, cols[colSqrtP].vals
			c.TopKIdx = make([]int32, T*K)
			c.TopKProb = make([]float32, T*K)
			for t := range T {
				e := (t0 + t) * K
				if !decodeTopK(lo[e:e+K], hi[e*hiW:(e+K)*hiW], sq[e:e+K], m.Vocab, hiW, c.TopKIdx[t*K:(t+1)*K], c.TopKProb[t*K:(t+1)*K]) {
					return nil, fmt.Errorf("%w: row %d token %d: top-k id beyond the vocabulary %d", ErrCorrupt, r, t, m.Vocab)
				}
			}
		}
		if m.Final {
			c.XFinal = make([]float32, T*d)
			if !getActs(m.ActDType, c.XFinal, cols[colXFinal].vals[t0*d*aw:]) {
				return nil, fmt.Errorf("%w: row %d: non-finite x_final", ErrCorrupt, r)
			}
		}
		out = append(out, c)
	}
	return out, nil
}
