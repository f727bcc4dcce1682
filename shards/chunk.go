package shards

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
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
	colCRC      = "crc32c"
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
		{Name: colCRC, Type: arrow.PrimitiveTypes.Uint32},
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

// chunkCols are the value bytes of a chunk record's nested columns, little-endian, token
// after token; absent columns are nil.
type chunkCols struct {
	ids, xcut, lo, hi, sq, xfin []byte
}

// colWidths returns the bytes per token of each chunkCols column under m (0: absent).
func colWidths(m Meta) [6]int {
	aw := m.ActDType.Size()
	w := [6]int{4, m.Dim * aw, m.K, m.K * m.hiWidth(), m.K, 0}
	if m.Final {
		w[5] = m.Dim * aw
	}
	return w
}

func (c *chunkCols) list() [6]*[]byte {
	return [6]*[]byte{&c.ids, &c.xcut, &c.lo, &c.hi, &c.sq, &c.xfin}
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// rowCRC returns the CRC-32C of a row: its five position fields as little-endian int32
// (window int64) followed by its tokens [t0, t1) of every present column in schema order.
func rowCRC(m Meta, pos [5]int, cols *chunkCols, t0, t1 int) uint32 {
	var head [24]byte
	binary.LittleEndian.PutUint32(head[0:], uint32(pos[0]))
	binary.LittleEndian.PutUint64(head[4:], uint64(pos[1]))
	binary.LittleEndian.PutUint32(head[12:], uint32(pos[2]))
	binary.LittleEndian.PutUint32(head[16:], uint32(pos[3]))
	binary.LittleEndian.PutUint32(head[20:], uint32(pos[4]))
	crc := crc32.Update(0, castagnoli, head[:])
	w := colWidths(m)
	for i, b := range cols.list() {
		if w[i] > 0 {
			crc = crc32.Update(crc, castagnoli, (*b)[t0*w[i]:t1*w[i]])
		}
	}
	return crc
}

// chunkRecord builds the record of rows (validated by checkChunk) under schema.
func chunkRecord(m Meta, schema *arrow.Schema, rows []Chunk) (arrow.Record, error) {
	R := len(rows)
	offs := make([]int32, R+1)
	for r := range rows {
		offs[r+1] = offs[r] + int32(rows[r].Tokens())
	}
	total := int(offs[R])
	var scal [6][]byte
	for i, w := range [6]int{4, 8, 4, 4, 4, 4} {
		scal[i] = make([]byte, w*R)
	}
	w := colWidths(m)
	var cols chunkCols
	for i, b := range cols.list() {
		if w[i] > 0 {
			*b = make([]byte, total*w[i])
		}
	}
	aw, hiW, K := m.ActDType.Size(), m.hiWidth(), m.K
	scratch := newTopKScratch(K)
	for r := range rows {
		c := &rows[r]
		pos := [5]int{c.Shard, c.Window, c.Chunk, c.Chunks, c.TokenLo}
		binary.LittleEndian.PutUint32(scal[0][4*r:], uint32(c.Shard))
		binary.LittleEndian.PutUint64(scal[1][8*r:], uint64(c.Window))
		binary.LittleEndian.PutUint32(scal[2][4*r:], uint32(c.Chunk))
		binary.LittleEndian.PutUint32(scal[3][4*r:], uint32(c.Chunks))
		binary.LittleEndian.PutUint32(scal[4][4*r:], uint32(c.TokenLo))
		t0, t1 := int(offs[r]), int(offs[r+1])
		for t, id := range c.InputIDs {
			binary.LittleEndian.PutUint32(cols.ids[4*(t0+t):], uint32(id))
		}
		if err := putActs(m.ActDType, cols.xcut[t0*m.Dim*aw:], c.XCut); err != nil {
			return nil, fmt.Errorf("x_cut of (shard %d, window %d, chunk %d): %w", c.Shard, c.Window, c.Chunk, err)
		}
		if m.Final {
			if err := putActs(m.ActDType, cols.xfin[t0*m.Dim*aw:], c.XFinal); err != nil {
				return nil, fmt.Errorf("x_final of (shard %d, window %d, chunk %d): %w", c.Shard, c.Window, c.Chunk, err)
			}
		}
		for t := 0; K > 0 && t < c.Tokens(); t++ {
			e := (t0 + t) * K
			if err := encodeTopK(c.TopKIdx[t*K:(t+1)*K], c.TopKProb[t*K:(t+1)*K], m.Vocab, hiW,
				cols.lo[e:e+K], cols.hi[e*hiW:(e+K)*hiW], cols.sq[e:e+K], scratch); err != nil {
				return nil, fmt.Errorf("top-k of (shard %d, window %d, chunk %d) token %d: %w", c.Shard, c.Window, c.Chunk, t, err)
			}
		}
		binary.LittleEndian.PutUint32(scal[5][4*r:], rowCRC(m, pos, &cols, t0, t1))
	}
	fields := schema.Fields()
	data := make([]arrow.ArrayData, 0, len(fields))
	for i := range scal {
		data = append(data, primData(fields[i].Type, R, scal[i]))
	}
	for i, b := range cols.list() {
		if w[i] > 0 {
			data = append(data, nestedData(fields[len(data)].Type, R, offs, *b))
		}
	}
	return newRecord(schema, data, R), nil
}

// decodeChunks appends the rows of rec (whose schema has been checked against m) to out.
// base is the index of rec's first row in its file or message, so that errors name the
// row there. Errors wrap ErrCorrupt.
func decodeChunks(m Meta, rec arrow.Record, base int, out []Chunk) ([]Chunk, error) {
	R := int(rec.NumRows())
	for i := range int(rec.NumCols()) {
		if n := rec.Column(i).Len(); n != R {
			return nil, fmt.Errorf("%w: column %s has %d rows, the record %d", ErrCorrupt, rec.ColumnName(i), n, R)
		}
	}
	var scal [6][]byte
	for i, w := range [6]int{4, 8, 4, 4, 4, 4} {
		var err error
		if scal[i], err = colValues(rec.ColumnName(i), rec.Column(i).Data(), w); err != nil {
			return nil, err
		}
	}
	w := colWidths(m)
	aw, hiW, K, d := m.ActDType.Size(), m.hiWidth(), m.K, m.Dim
	elem := [6]int{4, aw, 1, hiW, 1, aw} // bytes per primitive element
	var cols chunkCols
	var offs [6][]int
	next := len(scal)
	for i, b := range cols.list() {
		if w[i] == 0 {
			continue
		}
		var err error
		offs[i], *b, err = nestedValues(rec.ColumnName(next), rec.Column(next).Data(), elem[i])
		if err != nil {
			return nil, err
		}
		next++
	}
	for r := range R {
		c := Chunk{
			Shard:   int(int32(binary.LittleEndian.Uint32(scal[0][4*r:]))),
			Window:  int(int64(binary.LittleEndian.Uint64(scal[1][8*r:]))),
			Chunk:   int(int32(binary.LittleEndian.Uint32(scal[2][4*r:]))),
			Chunks:  int(int32(binary.LittleEndian.Uint32(scal[3][4*r:]))),
			TokenLo: int(int32(binary.LittleEndian.Uint32(scal[4][4*r:]))),
		}
		t0, t1 := offs[0][r], offs[0][r+1]
		T := t1 - t0
		for i := range cols.list() {
			if w[i] > 0 && (offs[i][r] != t0 || offs[i][r+1] != t1) {
				return nil, fmt.Errorf("%w: row %d: a column spans tokens [%d, %d), input_ids [%d, %d)", ErrCorrupt, base+r, offs[i][r], offs[i][r+1], t0, t1)
			}
		}
		if T < 1 {
			return nil, fmt.Errorf("%w: row %d has no tokens", ErrCorrupt, base+r)
		}
		pos := [5]int{c.Shard, c.Window, c.Chunk, c.Chunks, c.TokenLo}
		if got, want := rowCRC(m, pos, &cols, t0, t1), binary.LittleEndian.Uint32(scal[5][4*r:]); got != want {
			return nil, fmt.Errorf("%w: row %d (shard %d, window %d, chunk %d): CRC-32C %08x, recorded %08x", ErrCorrupt, base+r, c.Shard, c.Window, c.Chunk, got, want)
		}
		if c.Shard < 0 || c.Window < 0 || c.Chunks < 1 || c.Chunk < 0 || c.Chunk >= c.Chunks || c.TokenLo < 0 || c.TokenLo > math.MaxInt32-T {
			return nil, fmt.Errorf("%w: row %d: invalid position (shard %d, window %d, chunk %d of %d, token_lo %d)", ErrCorrupt, base+r, c.Shard, c.Window, c.Chunk, c.Chunks, c.TokenLo)
		}
		c.InputIDs = make([]int32, T)
		for t := range c.InputIDs {
			id := int32(binary.LittleEndian.Uint32(cols.ids[4*(t0+t):]))
			if id < 0 || int(id) >= m.Vocab {
				return nil, fmt.Errorf("%w: row %d: input id %d outside the vocabulary [0, %d)", ErrCorrupt, base+r, id, m.Vocab)
			}
			c.InputIDs[t] = id
		}
		c.XCut = make([]float32, T*d)
		if !getActs(m.ActDType, c.XCut, cols.xcut[t0*d*aw:]) {
			return nil, fmt.Errorf("%w: row %d: non-finite x_cut", ErrCorrupt, base+r)
		}
		if K > 0 {
			c.TopKIdx = make([]int32, T*K)
			c.TopKProb = make([]float32, T*K)
			for t := range T {
				e := (t0 + t) * K
				if !decodeTopK(cols.lo[e:e+K], cols.hi[e*hiW:(e+K)*hiW], cols.sq[e:e+K], m.Vocab, hiW, c.TopKIdx[t*K:(t+1)*K], c.TopKProb[t*K:(t+1)*K]) {
					return nil, fmt.Errorf("%w: row %d token %d: top-k id beyond the vocabulary %d", ErrCorrupt, base+r, t, m.Vocab)
				}
			}
		}
		if m.Final {
			c.XFinal = make([]float32, T*d)
			if !getActs(m.ActDType, c.XFinal, cols.xfin[t0*d*aw:]) {
				return nil, fmt.Errorf("%w: row %d: non-finite x_final", ErrCorrupt, base+r)
			}
		}
		out = append(out, c)
	}
	return out, nil
}
