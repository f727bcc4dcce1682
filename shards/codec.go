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
// checked, the framing check and allocation limit that keep the Arrow reader safe on
// untrusted bytes, and the recover at the decoding boundary.

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

// checkStream checks the framing of an Arrow IPC stream before the Arrow reader sees it:
// messages with continuation markers whose metadata and bodies lie within b, a schema
// message first and record batches after it (no dictionaries), and an end-of-stream
// marker exactly at the end. It keeps the reader from allocating what a corrupt length
// claims.
func checkStream(b []byte) error {
	bad := func(what string, at int) error {
		return fmt.Errorf("%w: IPC stream: %s at byte %d", ErrCorrupt, what, at)
	}
	for pos, msg := 0, 0; ; msg++ {
		if len(b)-pos < 8 {
			return bad("truncated (no end-of-stream marker)", pos)
		}
		if binary.LittleEndian.Uint32(b[pos:]) != 0xffffffff {
			return bad("no continuation marker", pos)
		}
		n := int(int32(binary.LittleEndian.Uint32(b[pos+4:])))
		pos += 8
		if n == 0 {
			if pos != len(b) {
				return bad("bytes after the end-of-stream marker", pos)
			}
			if msg < 1 {
				return bad("no schema", pos)
			}
			return nil
		}
		if n < 0 || n > len(b)-pos {
			return bad(fmt.Sprintf("metadata length %d", n), pos)
		}
		typ, header, body, ok := messageHeader(b[pos : pos+n])
		if !ok || (msg == 0 && !fbuf(b[pos:pos+n]).checkSchemaFB(header)) {
			return bad("malformed message metadata", pos)
		}
		const schemaMsg, recordMsg = 1, 3
		if (msg == 0 && typ != schemaMsg) || (msg > 0 && typ != recordMsg) {
			return bad(fmt.Sprintf("message %d of type %d", msg, typ), pos)
		}
		pos += n
		if body < 0 || body > int64(len(b)-pos) {
			return bad(fmt.Sprintf("body length %d", body), pos)
		}
		pos += int(body)
	}
}

// fbuf is a flatbuffer read with every offset bounds-checked: the IPC metadata of
// untrusted messages. Methods return ok = false for anything out of range.
type fbuf []byte

func (b fbuf) u32(at int) (int, bool) {
	if at < 0 || at > len(b)-4 {
		return 0, false
	}
	return int(binary.LittleEndian.Uint32(b[at:])), true
}

// table returns the position of the table at at and its vtable.
func (b fbuf) table(at int) (tab, vt, vtLen int, ok bool) {
	so, ok := b.u32(at)
	if !ok {
		return 0, 0, 0, false
	}
	vt = at - int(int32(so))
	if vt < 0 || vt > len(b)-4 {
		return 0, 0, 0, false
	}
	vtLen = int(binary.LittleEndian.Uint16(b[vt:]))
	if vtLen < 4 || vtLen%2 != 0 || vt+vtLen > len(b) {
		return 0, 0, 0, false
	}
	return at, vt, vtLen, true
}

// field returns the position of field i (size bytes) of the table at tab, or −1 when absent.
func (b fbuf) field(tab, vt, vtLen, i, size int) (int, bool) {
	slot := 4 + 2*i
	if slot+2 > vtLen {
		return -1, true
	}
	off := int(binary.LittleEndian.Uint16(b[vt+slot:]))
	if off == 0 {
		return -1, true
	}
	if tab+off+size > len(b) {
		return 0, false
	}
	return tab + off, true
}

// deref follows the offset stored at at (a table, vector or string reference).
func (b fbuf) deref(at int) (int, bool) {
	o, ok := b.u32(at)
	if !ok || o == 0 {
		return 0, false
	}
	return at + o, at+o < len(b)
}

// vector returns the start and length of the vector referenced at at, whose elements are
// elem bytes, checking that it lies within b.
func (b fbuf) vector(at, elem int) (start, n int, ok bool) {
	v, ok := b.deref(at)
	if !ok {
		return 0, 0, false
	}
	n, ok = b.u32(v)
	if !ok || n < 0 || n > (len(b)-v-4)/elem {
		return 0, 0, false
	}
	return v + 4, n, true
}

// tableVector checks the vector of tables referenced by field i of a table and calls fn
// with each element table's position.
func (b fbuf) tableVector(tab, vt, vtLen, i int, fn func(at int) bool) bool {
	at, ok := b.field(tab, vt, vtLen, i, 4)
	if !ok {
		return false
	}
	if at < 0 {
		return true
	}
	start, n, ok := b.vector(at, 4)
	if !ok {
		return false
	}
	for e := range n {
		t, ok := b.deref(start + 4*e)
		if !ok || !fn(t) {
			return false
		}
	}
	return true
}

// messageHeader reads the header type, header table and body length of an IPC Message
// flatbuffer (table fields 1, 2 and 3).
func messageHeader(fb []byte) (typ byte, header int, body int64, ok bool) {
	b := fbuf(fb)
	root, ok := b.deref(0)
	if !ok {
		return 0, 0, 0, false
	}
	tab, vt, vtLen, ok := b.table(root)
	if !ok {
		return 0, 0, 0, false
	}
	at, ok := b.field(tab, vt, vtLen, 1, 1)
	if !ok || at < 0 {
		return 0, 0, 0, false
	}
	typ = fb[at]
	if at, ok = b.field(tab, vt, vtLen, 2, 4); !ok || at < 0 {
		return 0, 0, 0, false
	}
	if header, ok = b.deref(at); !ok {
		return 0, 0, 0, false
	}
	if at, ok = b.field(tab, vt, vtLen, 3, 8); !ok {
		return 0, 0, 0, false
	}
	if at >= 0 {
		body = int64(binary.LittleEndian.Uint64(fb[at:]))
	}
	// The message's own custom metadata, which the reader also allocates from.
	if !b.tableVector(tab, vt, vtLen, 4, b.keyValue) {
		return 0, 0, 0, false
	}
	return typ, header, body, true
}

// keyValue checks a KeyValue table (key, value strings).
func (b fbuf) keyValue(at int) bool {
	tab, vt, vtLen, ok := b.table(at)
	if !ok {
		return false
	}
	for i := range 2 {
		f, ok := b.field(tab, vt, vtLen, i, 4)
		if !ok {
			return false
		}
		if f >= 0 {
			if _, _, ok := b.vector(f, 1); !ok {
				return false
			}
		}
	}
	return true
}

// maxSchemaTables bounds the tables checkSchemaFB visits (and so the reader's work).
const maxSchemaTables = 4096

// checkSchemaFB checks the Schema table at at: its fields (recursively, their names,
// children and metadata) and metadata vectors lie within b, at most maxSchemaTables tables
// deep and wide. The Arrow reader sizes allocations by these vectors' lengths.
func (b fbuf) checkSchemaFB(at int) bool {
	tab, vt, vtLen, ok := b.table(at)
	if !ok {
		return false
	}
	budget := maxSchemaTables
	var field func(at, depth int) bool
	field = func(at, depth int) bool {
		budget--
		if budget < 0 || depth > 32 {
			return false
		}
		tab, vt, vtLen, ok := b.table(at)
		if !ok {
			return false
		}
		if f, ok := b.field(tab, vt, vtLen, 0, 4); !ok {
			return false
		} else if f >= 0 {
			if _, _, ok := b.vector(f, 1); !ok {
				return false
			}
		}
		return b.tableVector(tab, vt, vtLen, 5, func(c int) bool { return field(c, depth+1) }) &&
			b.tableVector(tab, vt, vtLen, 6, b.keyValue)
	}
	if !b.tableVector(tab, vt, vtLen, 1, func(c int) bool { return field(c, 0) }) || !b.tableVector(tab, vt, vtLen, 2, b.keyValue) {
		return false
	}
	if f, ok := b.field(tab, vt, vtLen, 3, 4); !ok {
		return false
	} else if f >= 0 {
		if _, _, ok := b.vector(f, 8); !ok {
			return false
		}
	}
	return true
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
	if by < 0 || a.live+by > a.limit || a.live+by < a.live {
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
