package shards

import (
	"encoding/binary"
	"fmt"
	"math"
	"slices"

	"github.com/apache/arrow/go/v17/arrow"

	"linearpatch/patch"
)

// DecodeStats reassembles the Stats of the messages of one EncodeStats call, in any order
// (a message given twice is harmless). Errors as StatsAssembler.Add and Stats.
func DecodeStats(msgs [][]byte, want Meta) (*patch.Stats, error) {
	a := NewStatsAssembler(want)
	for i, m := range msgs {
		if err := a.Add(m); err != nil {
			return nil, fmt.Errorf("statistics message %d: %w", i, err)
		}
	}
	return a.Stats()
}

// StatsAssembler collects the messages of one EncodeStats call, arriving in any order and
// possibly more than once, into a patch.Stats. It is not safe for concurrent use.
type StatsAssembler struct {
	want   Meta
	shape  *statsShape
	wins   map[int]*windowAcc
	gram   map[int]*gramAcc
	filled int // window layers and Gram rows received
}

type windowAcc struct {
	tokens   int
	cos      []float64
	abs, rot [][]float64
}

type gramAcc struct {
	tokens   int64
	xtx, xty []float64
	have     []bool
}

// NewStatsAssembler returns an assembler of statistics messages whose Meta must equal want.
func NewStatsAssembler(want Meta) *StatsAssembler {
	return &StatsAssembler{want: want, wins: map[int]*windowAcc{}, gram: map[int]*gramAcc{}}
}

// Add decodes msg and takes in its rows; a row already held is ignored when bit-identical.
// On error the assembler is unchanged. Errors wrap ErrVersion, ErrForeign, ErrCorrupt (bad
// bytes, a shape differing from earlier messages, a row outside the shape, more windows
// than announced, or a row that conflicts with one already held) or ErrInvalid (want).
func (a *StatsAssembler) Add(msg []byte) (err error) {
	if err := a.want.Validate(); err != nil {
		return err
	}
	defer recoverCorrupt(&err)
	rd, err := openStream(msg)
	if err != nil {
		return err
	}
	defer rd.Release()
	_, kind, err := metaFrom(rd.Schema().Metadata())
	if err != nil {
		return err
	}
	if kind != kindStatsGram {
		kind = kindStatsWindows // anything else is checked (and rejected) as a windows message
	}
	meta, err := checkSchema(rd.Schema(), a.want, kind)
	if err != nil {
		return err
	}
	shape, err := shapeFrom(rd.Schema().Metadata(), meta.Dim)
	if err != nil {
		return err
	}
	if a.shape != nil && !a.shape.equal(shape) {
		return fmt.Errorf("%w: statistics shape %+v differs from earlier messages' %+v", ErrCorrupt, shape, *a.shape)
	}
	var wrows []windowRow
	var grows []gramRow
	err = readAllRecords(rd, func(rec arrow.Record) error {
		var err error
		if kind == kindStatsWindows {
			wrows, err = decodeWindowRows(rec, meta.Dim, shape, wrows)
		} else {
			grows, err = decodeGramRows(rec, meta.Dim, shape, grows)
		}
		return err
	})
	if err != nil {
		return err
	}
	return a.apply(shape, meta.Dim, wrows, grows)
}

func decodeWindowRows(rec arrow.Record, d int, s statsShape, out []windowRow) ([]windowRow, error) {
	R := int(rec.NumRows())
	var sc [4][]byte
	widths := [4]int{8, 8, 4, 8}
	for i := range sc {
		c := rec.Column(i).Data()
		if c.Len() != R {
			return nil, fmt.Errorf("%w: column %s has %d rows, the record %d", ErrCorrupt, rec.ColumnName(i), c.Len(), R)
		}
		var err error
		if i == 3 {
			sc[i], err = valueBytes(colCosSum, c, 8)
		} else {
			sc[i], err = colValues(rec.ColumnName(i), c, widths[i])
		}
		if err != nil {
			return nil, err
		}
	}
	valid, err := validBits(colCosSum, rec.Column(3).Data())
	if err != nil {
		return nil, err
	}
	crcs, err := colValues(colCRC, rec.Column(6).Data(), 4)
	if err != nil || rec.Column(6).Len() != R {
		return nil, fmt.Errorf("%w: column %s: %v", ErrCorrupt, colCRC, err)
	}
	var vecs [2][]byte
	for i := range vecs {
		c := rec.Column(4 + i).Data()
		if c.Len() != R {
			return nil, fmt.Errorf("%w: column %s has %d rows, the record %d", ErrCorrupt, rec.ColumnName(4+i), c.Len(), R)
		}
		if _, vecs[i], err = nestedValues(rec.ColumnName(4+i), c, 8); err != nil {
			return nil, err
		}
	}
	for r := range R {
		w := windowRow{
			window: int(int64(binary.LittleEndian.Uint64(sc[0][8*r:]))),
			tokens: int(int64(binary.LittleEndian.Uint64(sc[1][8*r:]))),
			layer:  int(int32(binary.LittleEndian.Uint32(sc[2][4*r:]))),
			hasCos: valid == nil || valid[r],
		}
		if crcOf(sc[0][8*r:8*r+8], sc[1][8*r:8*r+8], sc[2][4*r:4*r+4], cosBytes(w.hasCos, sc[3][8*r:8*r+8]),
			vecs[0][8*d*r:8*d*(r+1)], vecs[1][8*d*r:8*d*(r+1)]) != binary.LittleEndian.Uint32(crcs[4*r:]) {
			return nil, fmt.Errorf("%w: statistics row %d: CRC-32C mismatch", ErrCorrupt, r)
		}
		if w.window < 0 || w.tokens < 1 || w.layer < 0 || w.layer > s.layers || w.hasCos != (w.layer <= s.layers-s.numPrune) {
			return nil, fmt.Errorf("%w: statistics row %d: window %d, %d tokens, layer %d (cosine present %v) outside the shape", ErrCorrupt, r, w.window, w.tokens, w.layer, w.hasCos)
		}
		if w.hasCos {
			w.cos = math.Float64frombits(binary.LittleEndian.Uint64(sc[3][8*r:]))
		}
		w.abs = getF64s(vecs[0][8*d*r:], d)
		w.rot = getF64s(vecs[1][8*d*r:], d)
		out = append(out, w)
	}
	return out, nil
}

func decodeGramRows(rec arrow.Record, d int, s statsShape, out []gramRow) ([]gramRow, error) {
	R := int(rec.NumRows())
	var sc [3][]byte
	widths := [3]int{4, 8, 4}
	for i := range sc {
		c := rec.Column(i).Data()
		if c.Len() != R {
			return nil, fmt.Errorf("%w: column %s has %d rows, the record %d", ErrCorrupt, rec.ColumnName(i), c.Len(), R)
		}
		var err error
		if sc[i], err = colValues(rec.ColumnName(i), c, widths[i]); err != nil {
			return nil, err
		}
	}
	crcs, err := colValues(colCRC, rec.Column(5).Data(), 4)
	if err != nil || rec.Column(5).Len() != R {
		return nil, fmt.Errorf("%w: column %s: %v", ErrCorrupt, colCRC, err)
	}
	var offs [2][]int
	var vals [2][]byte
	for i := range 2 {
		c := rec.Column(3 + i).Data()
		if c.Len() != R {
			return nil, fmt.Errorf("%w: column %s has %d rows, the record %d", ErrCorrupt, rec.ColumnName(3+i), c.Len(), R)
		}
		var err error
		if offs[i], vals[i], err = nestedValues(rec.ColumnName(3+i), c, 8); err != nil {
			return nil, err
		}
	}
	for r := range R {
		g := gramRow{
			start:  int(int32(binary.LittleEndian.Uint32(sc[0][4*r:]))),
			tokens: int64(binary.LittleEndian.Uint64(sc[1][8*r:])),
			rowLo:  int(int32(binary.LittleEndian.Uint32(sc[2][4*r:]))),
		}
		lo, hi := offs[0][r], offs[0][r+1]
		if offs[1][r] != lo || offs[1][r+1] != hi {
			return nil, fmt.Errorf("%w: Gram row %d: xtx and xty blocks differ in size", ErrCorrupt, r)
		}
		if !slices.Contains(s.starts, g.start) || g.tokens < 0 || g.rowLo < 0 || hi-lo < 1 || g.rowLo+(hi-lo) > d {
			return nil, fmt.Errorf("%w: Gram row %d: start %d, rows [%d, %d) outside the shape", ErrCorrupt, r, g.start, g.rowLo, g.rowLo+hi-lo)
		}
		if crcOf(sc[0][4*r:4*r+4], sc[1][8*r:8*r+8], sc[2][4*r:4*r+4], vals[0][8*d*lo:8*d*hi], vals[1][8*d*lo:8*d*hi]) != binary.LittleEndian.Uint32(crcs[4*r:]) {
			return nil, fmt.Errorf("%w: Gram row %d: CRC-32C mismatch", ErrCorrupt, r)
		}
		g.xtx = getF64s(vals[0][8*d*lo:], d*(hi-lo))
		g.xty = getF64s(vals[1][8*d*lo:], d*(hi-lo))
		out = append(out, g)
	}
	return out, nil
}

// sameBits reports whether a and b hold the same float64 bit patterns.
func sameBits(a, b []float64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if math.Float64bits(a[i]) != math.Float64bits(b[i]) {
			return false
		}
	}
	return true
}

// apply checks the decoded rows against what a holds and against each other, then takes
// them in: a row held already (or repeated in the message) is skipped when bit-identical.
func (a *StatsAssembler) apply(s statsShape, d int, wrows []windowRow, grows []gramRow) error {
	type key struct{ a, b int }
	seenW := map[key]*windowRow{}
	winTokens := map[int]int{}
	for i := range wrows {
		w := &wrows[i]
		t, ok := winTokens[w.window]
		if !ok {
			t = w.tokens
			if held := a.wins[w.window]; held != nil {
				t = held.tokens
			}
			winTokens[w.window] = t
		}
		if t != w.tokens {
			return fmt.Errorf("%w: window %d has %d tokens, elsewhere %d", ErrCorrupt, w.window, w.tokens, t)
		}
		prev := seenW[key{w.window, w.layer}]
		if prev == nil {
			if held := a.wins[w.window]; held != nil && held.abs[w.layer] != nil {
				prev = &windowRow{abs: held.abs[w.layer], rot: held.rot[w.layer], hasCos: w.hasCos}
				if w.hasCos {
					prev.cos = held.cos[w.layer]
				}
			}
		}
		if prev != nil && (!sameBits(prev.abs, w.abs) || !sameBits(prev.rot, w.rot) || math.Float64bits(prev.cos) != math.Float64bits(w.cos)) {
			return fmt.Errorf("%w: window %d layer %d received twice with different values", ErrCorrupt, w.window, w.layer)
		}
		seenW[key{w.window, w.layer}] = w
	}
	windows := len(a.wins)
	for w := range winTokens {
		if a.wins[w] == nil {
			windows++
		}
	}
	if windows > s.windows {
		return fmt.Errorf("%w: %d windows, beyond the %d announced", ErrCorrupt, windows, s.windows)
	}
	seenG := map[key][2][]float64{}
	gramTokens := map[int]int64{}
	for _, g := range grows {
		t, ok := gramTokens[g.start]
		if !ok {
			t = g.tokens
			if held := a.gram[g.start]; held != nil {
				t = held.tokens
			}
			gramTokens[g.start] = t
		}
		if t != g.tokens {
			return fmt.Errorf("%w: Gram sums of start %d cover %d tokens, elsewhere %d", ErrCorrupt, g.start, g.tokens, t)
		}
		for r := range len(g.xtx) / d {
			row := g.rowLo + r
			cur := [2][]float64{g.xtx[r*d : (r+1)*d], g.xty[r*d : (r+1)*d]}
			prev, ok := seenG[key{g.start, row}]
			if held := a.gram[g.start]; !ok && held != nil && held.have[row] {
				prev, ok = [2][]float64{held.xtx[row*d : (row+1)*d], held.xty[row*d : (row+1)*d]}, true
			}
			if ok && (!sameBits(prev[0], cur[0]) || !sameBits(prev[1], cur[1])) {
				return fmt.Errorf("%w: Gram row %d of start %d received twice with different values", ErrCorrupt, row, g.start)
			}
			seenG[key{g.start, row}] = cur
		}
	}

	if a.shape == nil {
		a.shape = &s
	}
	L, n := s.layers, s.numPrune
	for _, w := range wrows {
		acc := a.wins[w.window]
		if acc == nil {
			acc = &windowAcc{tokens: w.tokens, cos: make([]float64, L-n+1), abs: make([][]float64, L+1), rot: make([][]float64, L+1)}
			a.wins[w.window] = acc
		}
		if acc.abs[w.layer] != nil {
			continue
		}
		acc.abs[w.layer], acc.rot[w.layer] = w.abs, w.rot
		if w.hasCos {
			acc.cos[w.layer] = w.cos
		}
		a.filled++
	}
	for _, g := range grows {
		acc := a.gram[g.start]
		if acc == nil {
			acc = &gramAcc{tokens: g.tokens, xtx: make([]float64, d*d), xty: make([]float64, d*d), have: make([]bool, d)}
			a.gram[g.start] = acc
		}
		for r := range len(g.xtx) / d {
			if acc.have[g.rowLo+r] {
				continue
			}
			acc.have[g.rowLo+r] = true
			copy(acc.xtx[(g.rowLo+r)*d:], g.xtx[r*d:(r+1)*d])
			copy(acc.xty[(g.rowLo+r)*d:], g.xty[r*d:(r+1)*d])
			a.filled++
		}
	}
	return nil
}

// Complete reports whether every row of the announced windows and Gram sums has arrived.
func (a *StatsAssembler) Complete() bool {
	if a.shape == nil {
		return false
	}
	return a.filled == a.shape.windows*(a.shape.layers+1)+len(a.shape.starts)*a.want.Dim
}

// Stats returns the assembled statistics (sharing no memory with later Adds), checked by
// patch.Stats.Validate. Errors wrap ErrCorrupt when rows are missing or the result is
// malformed.
func (a *StatsAssembler) Stats() (*patch.Stats, error) {
	if a.shape == nil {
		return nil, fmt.Errorf("%w: no statistics messages", ErrCorrupt)
	}
	if !a.Complete() {
		return nil, fmt.Errorf("%w: statistics incomplete: %d of %d rows", ErrCorrupt, a.filled, a.shape.windows*(a.shape.layers+1)+len(a.shape.starts)*a.want.Dim)
	}
	s := a.shape
	st := patch.NewStats(s.layers, a.want.Dim, s.numPrune, s.seqLen)
	idx := make([]int, 0, len(a.wins))
	for i := range a.wins {
		idx = append(idx, i)
	}
	slices.Sort(idx)
	for _, i := range idx {
		w := a.wins[i]
		st.Windows = append(st.Windows, patch.WindowStats{
			Index: i, Tokens: w.tokens, CosSum: slices.Clone(w.cos),
			AbsMean: cloneRows(w.abs), RotAbsMean: cloneRows(w.rot),
		})
	}
	if len(s.starts) > 0 {
		st.Gram = make(map[int]*patch.GramSum, len(s.starts))
		for _, i := range s.starts {
			g := a.gram[i]
			st.Gram[i] = &patch.GramSum{Start: i, Tokens: g.tokens, XtX: slices.Clone(g.xtx), XtY: slices.Clone(g.xty)}
		}
	}
	if err := st.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	return st, nil
}

func cloneRows(r [][]float64) [][]float64 {
	out := make([][]float64, len(r))
	for i := range r {
		out[i] = slices.Clone(r[i])
	}
	return out
}
