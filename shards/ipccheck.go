package shards

import (
	"encoding/binary"
	"fmt"
)

// The Arrow Go IPC reader trusts the lengths in a message: the metadata and body lengths of
// the framing and the vector lengths of the schema flatbuffer size its allocations. These
// checks run first on untrusted bytes.

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
