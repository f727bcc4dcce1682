package shards

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"sync"

	"github.com/apache/arrow/go/v17/arrow"
	"github.com/apache/arrow/go/v17/arrow/array"
	"github.com/apache/arrow/go/v17/arrow/ipc"
	"github.com/apache/arrow/go/v17/arrow/memory"
)

// This file holds the Arrow plumbing shared by the chunk and statistics codecs: building
// arrays straight from little-endian byte buffers, reading them back with every length
// checked, the allocation limit that (with the checks of ipccheck.go) keeps the Arrow
// reader safe on untrusted bytes, and the recover at the decoding boundary.

// Arrow types of the nested columns.
func listOf(elem arrow.DataType) *arrow.ListType { return arrow.ListOfNonNullable(elem) }

func fslOf(n int, elem arrow.DataType) *arrow.FixedSizeListType {
	return arrow.FixedSizeListOfNonNullable(int32(n), elem)
}

// primData wraps vals, the little-endian values of n elements, as an array of type dt.
func primData(dt arrow.DataType, n int, vals []byte) arrow.ArrayData {
	return array.NewData(dt, n, []*memory.Buffer{nil, memory.NewBufferBytes(vals)}, nil, 0, 0)
}

// nullablePrimData is primData with a validity bitmap (bit i set: element i valid).
func nullablePrimData(dt arrow.DataType, n int, valid []byte, nulls int, vals []byte) arrow.ArrayData {
	return array.NewData(dt, n, []*memory.Buffer{memory.NewBufferBytes(valid), memory.NewBufferBytes(vals)}, nil, nulls, 0)
}

// nestedData builds the column of type dt (a list<prim>, fixed_size_list<prim> or
// list<fixed_size_list<prim>>) holding rows rows; offs are the list offsets (nil for a
// fixed-size list), in elements of the list's child, and vals the primitive values.
func nestedData(dt arrow.DataType, rows int, offs []int32, vals []byte) arrow.ArrayData {
	switch t := dt.(type) {
	case *arrow.ListType:
		n := int(offs[len(offs)-1])
		child := nestedData(t.Elem(), n, nil, vals)
		defer child.Release()
		return array.NewData(t, rows, []*memory.Buffer{nil, memory.NewBufferBytes(int32Bytes(offs))}, []arrow.ArrayData{child}, 0, 0)
	case *arrow.FixedSizeListType:
		child := primData(t.Elem(), rows*int(t.Len()), vals)
		defer child.Release()
		return array.NewData(t, rows, []*memory.Buffer{nil}, []arrow.ArrayData{child}, 0, 0)
	}
	return primData(dt, rows, vals)
}

func int32Bytes(v []int32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], uint32(x))
	}
	return b
}

// newRecord assembles columns (one ArrayData per schema field) into a record of rows rows,
// releasing the ArrayData.
func newRecord(schema *arrow.Schema, cols []arrow.ArrayData, rows int) arrow.Record {
	arrs := make([]arrow.Array, len(cols))
	for i, d := range cols {
		arrs[i] = array.MakeFromData(d)
		d.Release()
	}
	rec := array.NewRecord(schema, arrs, int64(rows))
	for _, a := range arrs {
		a.Release()
	}
	return rec
}

// writeStream writes schema and recs as an Arrow IPC stream (uncompressed) into a new slice.
func writeStream(schema *arrow.Schema, sizeHint int, recs ...arrow.Record) ([]byte, error) {
	var buf bytes.Buffer
	buf.Grow(sizeHint)
	w := ipc.NewWriter(&buf, ipc.WithSchema(schema))
	for _, rec := range recs {
		if err := w.Write(rec); err != nil {
			w.Close()
			return nil, fmt.Errorf("shards: encode record batch: %w", err)
		}
	}
	if err := w.Close(); err != nil {
		return nil, fmt.Errorf("shards: encode record batch: %w", err)
	}
	return buf.Bytes(), nil
}

// sameFields reports whether got has exactly want's fields (names, types, nullability,
// field metadata), ignoring schema metadata.
func sameFields(got, want *arrow.Schema) bool {
	if got.NumFields() != want.NumFields() {
		return false
	}
	for i := range want.NumFields() {
		if !got.Field(i).Equal(want.Field(i)) {
			return false
		}
	}
	return true
}

// Reading columns. Every function checks the buffers' lengths against the array lengths
// and returns an error wrapping ErrCorrupt rather than index out of range.

// colValues returns the n·w bytes of the values of primitive array d (no nulls allowed).
func colValues(name string, d arrow.ArrayData, w int) ([]byte, error) {
	if d.NullN() != 0 {
		return nil, fmt.Errorf("%w: column %s holds nulls", ErrCorrupt, name)
	}
	return valueBytes(name, d, w)
}

// valueBytes returns the Len()·w value bytes of primitive array d, nulls or not.
func valueBytes(name string, d arrow.ArrayData, w int) ([]byte, error) {
	bufs := d.Buffers()
	lo, n := d.Offset(), d.Len()
	if len(bufs) < 2 || lo < 0 || n < 0 {
		return nil, fmt.Errorf("%w: column %s: malformed array", ErrCorrupt, name)
	}
	if n == 0 {
		return nil, nil
	}
	if bufs[1] == nil || bufs[1].Len()/w < lo+n || lo+n < lo {
		return nil, fmt.Errorf("%w: column %s: %d values do not fit its buffer", ErrCorrupt, name, n)
	}
	return bufs[1].Bytes()[lo*w : (lo+n)*w], nil
}

// validBits returns the validity of the n elements of d (nil: all valid).
func validBits(name string, d arrow.ArrayData) ([]bool, error) {
	if d.NullN() == 0 {
		return nil, nil
	}
	bufs := d.Buffers()
	lo, n := d.Offset(), d.Len()
	if len(bufs) < 1 || bufs[0] == nil || bufs[0].Len()*8 < lo+n {
		return nil, fmt.Errorf("%w: column %s: nulls without a validity bitmap", ErrCorrupt, name)
	}
	b := bufs[0].Bytes()
	out := make([]bool, n)
	for i := range out {
		j := lo + i
		out[i] = b[j/8]>>(j%8)&1 == 1
	}
	return out, nil
}

// nestedValues reads column d of type list<prim>, fixed_size_list<prim>, or
// list<fixed_size_list<prim>> whose primitive elements are w bytes wide. For a list it
// returns offs (len Len()+1, starting at 0) in elements of the list's child and the child's
// values; for a fixed-size list offs is nil. Element e of the child occupies
// vals[e·n·w : (e+1)·n·w] with n the fixed size (1 for a primitive child).
func nestedValues(name string, d arrow.ArrayData, w int) (offs []int, vals []byte, err error) {
	if d.NullN() != 0 {
		return nil, nil, fmt.Errorf("%w: column %s holds nulls", ErrCorrupt, name)
	}
	var child arrow.ArrayData
	switch d.DataType().(type) {
	case *arrow.ListType, *arrow.FixedSizeListType:
		kids := d.Children()
		if len(kids) != 1 {
			return nil, nil, fmt.Errorf("%w: column %s: malformed nested array", ErrCorrupt, name)
		}
		child = kids[0]
	}
	switch t := d.DataType().(type) {
	case *arrow.ListType:
		bufs := d.Buffers()
		lo, n := d.Offset(), d.Len()
		if len(bufs) < 2 || lo < 0 || n < 0 || bufs[1] == nil || bufs[1].Len()/4 < lo+n+1 || lo+n < lo {
			return nil, nil, fmt.Errorf("%w: column %s: list offsets do not fit their buffer", ErrCorrupt, name)
		}
		raw := bufs[1].Bytes()[4*lo:]
		base := int(int32(binary.LittleEndian.Uint32(raw)))
		offs = make([]int, n+1)
		for i := range offs {
			o := int(int32(binary.LittleEndian.Uint32(raw[4*i:]))) - base
			if base < 0 || o < 0 || (i > 0 && o < offs[i-1]) {
				return nil, nil, fmt.Errorf("%w: column %s: list offsets not ascending", ErrCorrupt, name)
			}
			offs[i] = o
		}
		if base+offs[n] > child.Len() {
			return nil, nil, fmt.Errorf("%w: column %s: list offsets beyond the child's %d elements", ErrCorrupt, name, child.Len())
		}
		per := w
		if ft, ok := t.Elem().(*arrow.FixedSizeListType); ok {
			per *= int(ft.Len())
		}
		_, all, err := nestedValues(name, child, w)
		if err != nil {
			return nil, nil, err
		}
		return offs, all[base*per : (base+offs[n])*per], nil
	case *arrow.FixedSizeListType:
		size := int(t.Len())
		if child.NullN() != 0 {
			return nil, nil, fmt.Errorf("%w: column %s holds nulls", ErrCorrupt, name)
		}
		lo, n := d.Offset(), d.Len()
		if size < 0 || lo < 0 || n < 0 || (lo+n)*size > child.Len() || lo+n < lo {
			return nil, nil, fmt.Errorf("%w: column %s: fixed-size lists beyond their child", ErrCorrupt, name)
		}
		all, err := valueBytes(name, child, w)
		if err != nil {
			return nil, nil, err
		}
		return nil, all[lo*size*w : (lo+n)*size*w], nil
	}
	v, err := valueBytes(name, d, w)
	return nil, v, err
}

// limitAlloc is an Arrow allocator that panics (recovered at the decoding boundary) once
// more than limit bytes are live, so a corrupt size cannot exhaust memory.
type limitAlloc struct {
	mu          sync.Mutex
	limit, live int
	mem         memory.Allocator
}

type allocLimitPanic struct{ want, limit int }

func newLimitAlloc(limit int) *limitAlloc {
	return &limitAlloc{limit: limit, mem: memory.NewGoAllocator()}
}

func (a *limitAlloc) grow(by int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.live+by > a.limit || (by > 0 && a.live+by < a.live) {
		panic(allocLimitPanic{a.live + by, a.limit})
	}
	a.live += by
}

func (a *limitAlloc) Allocate(size int) []byte {
	a.grow(size)
	return a.mem.Allocate(size)
}

func (a *limitAlloc) Reallocate(size int, b []byte) []byte {
	a.grow(size - len(b))
	return a.mem.Reallocate(size, b)
}

func (a *limitAlloc) Free(b []byte) {
	a.mu.Lock()
	a.live -= len(b)
	a.mu.Unlock()
	a.mem.Free(b)
}

// recoverCorrupt turns a panic inside the Arrow reader (or a decoder) into an error
// wrapping ErrCorrupt. Use as: defer recoverCorrupt(&err).
func recoverCorrupt(err *error) {
	if r := recover(); r != nil {
		if p, ok := r.(allocLimitPanic); ok {
			*err = fmt.Errorf("%w: decoding would allocate %d bytes (limit %d)", ErrCorrupt, p.want, p.limit)
			return
		}
		*err = fmt.Errorf("%w: %v", ErrCorrupt, r)
	}
}

// decodeLimit is the allocation limit for decoding a message of n bytes. Our messages are
// uncompressed (the reader allocates about n bytes); a compressed one may expand 16-fold.
func decodeLimit(n int) int { return 16*n + 1<<20 }

// openStream checks b's framing and opens an Arrow IPC stream reader on it with an
// allocation limit. The caller releases the reader.
func openStream(b []byte) (*ipc.Reader, error) {
	if err := checkStream(b); err != nil {
		return nil, err
	}
	rd, err := ipc.NewReader(bytes.NewReader(b), ipc.WithAllocator(newLimitAlloc(decodeLimit(len(b)))))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	return rd, nil
}

// readAllRecords calls fn with every record of rd, returning the reader's error (wrapped
// in ErrCorrupt) or fn's.
func readAllRecords(rd *ipc.Reader, fn func(arrow.Record) error) error {
	for rd.Next() {
		if err := fn(rd.Record()); err != nil {
			return err
		}
	}
	if err := rd.Err(); err != nil && err != io.EOF {
		return fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	return nil
}
