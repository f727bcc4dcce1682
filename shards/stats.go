package shards

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"math"
	"slices"
	"strconv"
	"strings"

	"github.com/apache/arrow/go/v17/arrow"

	"linearpatch/patch"
)

// Calibration statistics (patch.Stats) travel as two kinds of records, each message a
// self-contained Arrow IPC stream whose schema metadata carries the Meta (Start = End = −1
// by convention) and the Stats' shape:
//
//	stats.windows: one row per (window, layer l = 0..L)
//	stats.gram:    one row per (start, block of rows of the d×d Gram sums)
//
// Floats are float64 columns, so a Stats survives bit-exactly.

// Statistics metadata keys.
const (
	keyStatsLayers   = "linearpatch.stats.layers"
	keyStatsNumPrune = "linearpatch.stats.num_prune"
	keyStatsSeqLen   = "linearpatch.stats.seq_len"
	keyStatsWindows  = "linearpatch.stats.windows"     // number of windows in the Stats
	keyStatsStarts   = "linearpatch.stats.gram_starts" // comma-separated Gram starts, ascending
)

const (
	colLayer      = "layer"
	colTokens     = "tokens"
	colCosSum     = "cos_sum"
	colAbsMean    = "abs_mean"
	colRotAbsMean = "rot_abs_mean"
	colStart      = "start"
	colRowLo      = "row_lo"
	colXtX        = "xtx"
	colXtY        = "xty"
)

// statsShape is the shape of a Stats as carried in metadata.
type statsShape struct {
	layers, numPrune, seqLen, windows int
	starts                            []int
}

func (s statsShape) metadata() []string {
	starts := make([]string, len(s.starts))
	for i, v := range s.starts {
		starts[i] = strconv.Itoa(v)
	}
	return []string{
		keyStatsLayers, strconv.Itoa(s.layers), keyStatsNumPrune, strconv.Itoa(s.numPrune),
		keyStatsSeqLen, strconv.Itoa(s.seqLen), keyStatsWindows, strconv.Itoa(s.windows),
		keyStatsStarts, strings.Join(starts, ","),
	}
}

func (s statsShape) equal(o statsShape) bool {
	return s.layers == o.layers && s.numPrune == o.numPrune && s.seqLen == o.seqLen && s.windows == o.windows && slices.Equal(s.starts, o.starts)
}

func shapeFrom(md arrow.Metadata, dim int) (statsShape, error) {
	var s statsShape
	get := func(k string) (string, error) {
		if i := md.FindKey(k); i >= 0 {
			return md.Values()[i], nil
		}
		return "", fmt.Errorf("%w: statistics metadata lacks %s", ErrCorrupt, k)
	}
	for _, f := range []struct {
		key string
		dst *int
	}{{keyStatsLayers, &s.layers}, {keyStatsNumPrune, &s.numPrune}, {keyStatsSeqLen, &s.seqLen}, {keyStatsWindows, &s.windows}} {
		v, err := get(f.key)
		if err != nil {
			return s, err
		}
		if *f.dst, err = strconv.Atoi(v); err != nil {
			return s, fmt.Errorf("%w: statistics metadata %s = %q", ErrCorrupt, f.key, v)
		}
	}
	v, err := get(keyStatsStarts)
	if err != nil {
		return s, err
	}
	if s.layers < 1 || s.numPrune < 1 || s.numPrune > s.layers || s.seqLen < 1 || s.windows < 0 || dim < 1 {
		return s, fmt.Errorf("%w: statistics shape (layers %d, num_prune %d, seq_len %d, windows %d)", ErrCorrupt, s.layers, s.numPrune, s.seqLen, s.windows)
	}
	if v != "" {
		for _, p := range strings.Split(v, ",") {
			i, err := strconv.Atoi(p)
			if err != nil || i < 0 || i > s.layers-s.numPrune || (len(s.starts) > 0 && i <= s.starts[len(s.starts)-1]) {
				return s, fmt.Errorf("%w: statistics metadata %s = %q", ErrCorrupt, keyStatsStarts, v)
			}
			s.starts = append(s.starts, i)
		}
	}
	return s, nil
}

func statsWindowSchema(m Meta, extra []string) *arrow.Schema {
	md := m.metadata(kindStatsWindows, extra...)
	return arrow.NewSchema([]arrow.Field{
		{Name: colWindow, Type: arrow.PrimitiveTypes.Int64},
		{Name: colTokens, Type: arrow.PrimitiveTypes.Int64},
		{Name: colLayer, Type: arrow.PrimitiveTypes.Int32},
		{Name: colCosSum, Type: arrow.PrimitiveTypes.Float64, Nullable: true}, // null for l > L−n
		{Name: colAbsMean, Type: fslOf(m.Dim, arrow.PrimitiveTypes.Float64)},
		{Name: colRotAbsMean, Type: fslOf(m.Dim, arrow.PrimitiveTypes.Float64)},
		{Name: colCRC, Type: arrow.PrimitiveTypes.Uint32},
	}, &md)
}

func statsGramSchema(m Meta, extra []string) *arrow.Schema {
	md := m.metadata(kindStatsGram, extra...)
	return arrow.NewSchema([]arrow.Field{
		{Name: colStart, Type: arrow.PrimitiveTypes.Int32},
		{Name: colTokens, Type: arrow.PrimitiveTypes.Int64},
		{Name: colRowLo, Type: arrow.PrimitiveTypes.Int32},
		{Name: colXtX, Type: listOf(fslOf(m.Dim, arrow.PrimitiveTypes.Float64))},
		{Name: colXtY, Type: listOf(fslOf(m.Dim, arrow.PrimitiveTypes.Float64))},
		{Name: colCRC, Type: arrow.PrimitiveTypes.Uint32},
	}, &md)
}

// windowRow is one (window, layer) row.
type windowRow struct {
	window, tokens, layer int
	cos                   float64
	hasCos                bool
	abs, rot              []float64
}

// gramRow is one block of rows [rowLo, rowLo+len/d) of start's Gram sums.
type gramRow struct {
	start, rowLo int
	tokens       int64
	xtx, xty     []float64
}

func putF64s(dst []byte, v []float64) {
	for i, x := range v {
		binary.LittleEndian.PutUint64(dst[8*i:], math.Float64bits(x))
	}
}

func getF64s(src []byte, n int) []float64 {
	out := make([]float64, n)
	for i := range out {
		out[i] = math.Float64frombits(binary.LittleEndian.Uint64(src[8*i:]))
	}
	return out
}

func windowRecord(schema *arrow.Schema, d int, rows []windowRow) arrow.Record {
	R := len(rows)
	win, tok, lay := make([]byte, 8*R), make([]byte, 8*R), make([]byte, 4*R)
	cos, valid := make([]byte, 8*R), make([]byte, (R+7)/8)
	abs, rot := make([]byte, 8*d*R), make([]byte, 8*d*R)
	crc := make([]byte, 4*R)
	nulls := 0
	for r, w := range rows {
		binary.LittleEndian.PutUint64(win[8*r:], uint64(w.window))
		binary.LittleEndian.PutUint64(tok[8*r:], uint64(w.tokens))
		binary.LittleEndian.PutUint32(lay[4*r:], uint32(w.layer))
		if w.hasCos {
			valid[r/8] |= 1 << (r % 8)
			binary.LittleEndian.PutUint64(cos[8*r:], math.Float64bits(w.cos))
		} else {
			nulls++
		}
		putF64s(abs[8*d*r:], w.abs)
		putF64s(rot[8*d*r:], w.rot)
		binary.LittleEndian.PutUint32(crc[4*r:], crcOf(win[8*r:8*r+8], tok[8*r:8*r+8], lay[4*r:4*r+4], cosBytes(w.hasCos, cos[8*r:8*r+8]),
			abs[8*d*r:8*d*(r+1)], rot[8*d*r:8*d*(r+1)]))
	}
	f := schema.Fields()
	return newRecord(schema, []arrow.ArrayData{
		primData(f[0].Type, R, win), primData(f[1].Type, R, tok), primData(f[2].Type, R, lay),
		nullablePrimData(f[3].Type, R, valid, nulls, cos),
		nestedData(f[4].Type, R, nil, abs), nestedData(f[5].Type, R, nil, rot),
		primData(f[6].Type, R, crc),
	}, R)
}

func gramRecord(schema *arrow.Schema, d int, g gramRow) arrow.Record {
	n := len(g.xtx) / d
	start, tok, lo := make([]byte, 4), make([]byte, 8), make([]byte, 4)
	binary.LittleEndian.PutUint32(start, uint32(g.start))
	binary.LittleEndian.PutUint64(tok, uint64(g.tokens))
	binary.LittleEndian.PutUint32(lo, uint32(g.rowLo))
	xtx, xty := make([]byte, 8*len(g.xtx)), make([]byte, 8*len(g.xty))
	putF64s(xtx, g.xtx)
	putF64s(xty, g.xty)
	crc := binary.LittleEndian.AppendUint32(nil, crcOf(start, tok, lo, xtx, xty))
	f := schema.Fields()
	offs := []int32{0, int32(n)}
	return newRecord(schema, []arrow.ArrayData{
		primData(f[0].Type, 1, start), primData(f[1].Type, 1, tok), primData(f[2].Type, 1, lo),
		nestedData(f[3].Type, 1, offs, xtx), nestedData(f[4].Type, 1, offs, xty),
		primData(f[5].Type, 1, crc),
	}, 1)
}

// crcOf returns the CRC-32C of the concatenation of parts.
func crcOf(parts ...[]byte) uint32 {
	var crc uint32
	for _, p := range parts {
		crc = crc32.Update(crc, castagnoli, p)
	}
	return crc
}

// cosBytes returns the bytes a cosine sum contributes to its row's CRC: its value, or
// eight zero bytes when null.
func cosBytes(valid bool, b []byte) []byte {
	if !valid {
		return make([]byte, 8)
	}
	return b
}

func encodeRecord(schema *arrow.Schema, rec arrow.Record, sizeHint int) ([]byte, error) {
	defer rec.Release()
	return writeStream(schema, sizeHint, rec)
}

// EncodeStats encodes st as one or more self-contained Arrow IPC messages, each at most
// maxPayload − HeaderMargin bytes: stats.windows messages of (window, layer) rows (at least
// one message, even for no windows), then for each Gram start in ascending order
// stats.gram messages of row blocks. meta must pass Validate and have Dim = st.Dim (use
// Start = End = −1). Errors wrap ErrInvalid (an invalid meta or st) or ErrPayload (one
// layer row, 2·Dim float64s, or one Gram row does not fit).
func EncodeStats(meta Meta, st *patch.Stats, maxPayload int) ([][]byte, error) {
	if err := meta.Validate(); err != nil {
		return nil, err
	}
	if err := st.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if st.Dim != meta.Dim {
		return nil, fmt.Errorf("%w: statistics of width %d, meta %d", ErrInvalid, st.Dim, meta.Dim)
	}
	meta.SchemaVersion = SchemaVersion
	d, L, n := st.Dim, st.Layers, st.NumPrune
	shape := statsShape{layers: L, numPrune: n, seqLen: st.SeqLen, windows: len(st.Windows)}
	for i := range st.Gram {
		shape.starts = append(shape.starts, i)
	}
	slices.Sort(shape.starts)
	extra := shape.metadata()
	budget := maxPayload - HeaderMargin

	// Windows: rowsPer rows per message, sized from an empty message.
	ws := statsWindowSchema(meta, extra)
	empty, err := encodeRecord(ws, windowRecord(ws, d, nil), 4096)
	if err != nil {
		return nil, err
	}
	rowBytes := 8 + 8 + 4 + 8 + 1 + 2*8*d + 4
	rowsPer := (budget - len(empty) - 16*len(ws.Fields())) / rowBytes
	if rowsPer < 1 {
		return nil, fmt.Errorf("%w: %d bytes for a statistics row of width %d (max payload %d, header margin %d)", ErrPayload, rowBytes, d, maxPayload, HeaderMargin)
	}
	var rows []windowRow
	for _, w := range st.Windows {
		for l := 0; l <= L; l++ {
			r := windowRow{window: w.Index, tokens: w.Tokens, layer: l, abs: w.AbsMean[l], rot: w.RotAbsMean[l]}
			if l <= L-n {
				r.cos, r.hasCos = w.CosSum[l], true
			}
			rows = append(rows, r)
		}
	}
	var msgs [][]byte
	for lo := 0; lo == 0 || lo < len(rows); lo += rowsPer {
		b, err := encodeRecord(ws, windowRecord(ws, d, rows[lo:min(lo+rowsPer, len(rows))]), len(empty)+rowsPer*rowBytes+1024)
		if err != nil {
			return nil, err
		}
		msgs = append(msgs, b)
	}

	// Gram sums: one row of blockRows matrix rows per message.
	if len(shape.starts) == 0 {
		return msgs, nil
	}
	gs := statsGramSchema(meta, extra)
	empty, err = encodeRecord(gs, gramRecord(gs, d, gramRow{}), 4096)
	if err != nil {
		return nil, err
	}
	blockRows := (budget - len(empty) - 16*len(gs.Fields())) / (2 * 8 * d)
	if blockRows < 1 {
		return nil, fmt.Errorf("%w: %d bytes for a Gram row of width %d (max payload %d, header margin %d)", ErrPayload, 2*8*d, d, maxPayload, HeaderMargin)
	}
	for _, i := range shape.starts {
		g := st.Gram[i]
		for lo := 0; lo < d; lo += blockRows {
			hi := min(d, lo+blockRows)
			b, err := encodeRecord(gs, gramRecord(gs, d, gramRow{start: i, rowLo: lo, tokens: g.Tokens, xtx: g.XtX[lo*d : hi*d], xty: g.XtY[lo*d : hi*d]}), len(empty)+blockRows*16*d+1024)
			if err != nil {
				return nil, err
			}
			msgs = append(msgs, b)
		}
	}
	return msgs, nil
}
