package model

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/apache/arrow/go/v17/arrow"
	"github.com/apache/arrow/go/v17/arrow/array"
	"github.com/apache/arrow/go/v17/arrow/ipc"
	"github.com/apache/arrow/go/v17/arrow/memory"
	"github.com/apache/arrow/go/v17/parquet"
	"github.com/apache/arrow/go/v17/parquet/file"
	"github.com/apache/arrow/go/v17/parquet/schema"
)

// Reading Parquet and Arrow IPC data files: the named text column (one document per row)
// or, without it, the input_ids integer-list column (token ids). Files are read one row
// group (Parquet) or record batch (Arrow) at a time.

// columnBatch is how many values a Parquet column reader returns per call.
const columnBatch = 4096

// One buffer the Arrow and Parquet readers allocate is capped, so that a corrupted length
// fails cleanly instead of exhausting memory: at 64 times the file's size (room for
// decompression), at least 64 MiB and at most 4 GiB.
const (
	allocPerFileByte = 64
	minColumnarAlloc = 64 << 20
	maxColumnarAlloc = 4 << 30
)

// cappedAllocator is the default allocator refusing (by panicking with an allocTooLarge,
// recovered by the readers) a buffer over max bytes.
type cappedAllocator struct {
	memory.Allocator
	max int64
}

// newCappedAllocator returns the allocator for reading f.
func newCappedAllocator(f *os.File) cappedAllocator {
	limit := int64(maxColumnarAlloc)
	if fi, err := f.Stat(); err == nil && fi.Mode().IsRegular() {
		limit = min(limit, max(minColumnarAlloc, allocPerFileByte*fi.Size()))
	}
	return cappedAllocator{Allocator: memory.DefaultAllocator, max: limit}
}

type allocTooLarge struct{ size, max int64 }

func (e allocTooLarge) String() string {
	return fmt.Sprintf("a buffer of %d bytes, over the %d this file can need (corrupted length?)", e.size, e.max)
}

func (a cappedAllocator) Allocate(size int) []byte {
	if size < 0 || int64(size) > a.max {
		panic(allocTooLarge{int64(size), a.max})
	}
	return a.Allocator.Allocate(size)
}

func (a cappedAllocator) Reallocate(size int, b []byte) []byte {
	if size < 0 || int64(size) > a.max {
		panic(allocTooLarge{int64(size), a.max})
	}
	return a.Allocator.Reallocate(size, b)
}

// recoverReader turns a panic inside the Arrow or Parquet library, reading an untrusted
// file, into an error wrapping ErrData.
func recoverReader(path string, err *error) {
	if r := recover(); r != nil {
		*err = fmt.Errorf("%w: %s: the file is corrupted or not what its header says: %v", ErrData, path, r)
	}
}

// missingColumn is the error for a file that has neither the text column nor input_ids.
func missingColumn(path, col string, have []string) error {
	return fmt.Errorf("%w: %s has no column %q (use --text-column) and no %s column; its columns: %s",
		ErrData, path, col, TokenColumn, strings.Join(have, ", "))
}

// parquetDocuments calls fn for every row of the text column (or the token column).
func parquetDocuments(ctx context.Context, path, col string, fn func(document) (bool, error)) (err error) {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("model: read data: %w", err)
	}
	defer f.Close()
	defer recoverReader(path, &err)
	rdr, err := file.NewParquetReader(f, file.WithReadProps(parquet.NewReaderProperties(newCappedAllocator(f))))
	if err != nil {
		return fmt.Errorf("%w: %s: not a readable Parquet file: %w", ErrData, path, err)
	}
	defer rdr.Close()
	sc := rdr.MetaData().Schema
	idx, isText := -1, false
	var names []string
	for i := range sc.NumColumns() {
		c := sc.Column(i)
		parts := c.ColumnPath()
		names = append(names, c.Path())
		switch {
		case len(parts) == 1 && parts[0] == col:
			if c.PhysicalType() != parquet.Types.ByteArray || c.MaxRepetitionLevel() != 0 {
				return fmt.Errorf("%w: %s: column %q is %s, not a string column", ErrData, path, col, c)
			}
			idx, isText = i, true
		case idx < 0 && len(parts) > 1 && parts[0] == TokenColumn:
			if (c.PhysicalType() != parquet.Types.Int32 && c.PhysicalType() != parquet.Types.Int64) || c.MaxRepetitionLevel() != 1 {
				return fmt.Errorf("%w: %s: column %q is %s, not a list of integers", ErrData, path, TokenColumn, c)
			}
			idx = i
		}
	}
	if idx < 0 {
		return missingColumn(path, col, names)
	}
	column := sc.Column(idx)
	row := 0
	for g := range rdr.NumRowGroups() {
		if err := ctx.Err(); err != nil {
			return err
		}
		cr, err := rdr.RowGroup(g).Column(idx)
		if err != nil {
			return fmt.Errorf("%w: %s: row group %d: %w", ErrData, path, g, err)
		}
		var stop bool
		if isText {
			stop, err = parquetText(cr, column, path, &row, fn)
		} else {
			stop, err = parquetTokens(cr, column, path, &row, fn)
		}
		if err != nil || stop {
			return err
		}
	}
	return nil
}

// rowWhere names row r (0-based) of path for errors, 1-based.
func rowWhere(path string, r int) string { return fmt.Sprintf("%s: row %d", path, r+1) }

// parquetText reads a string column chunk: a null row is blank.
func parquetText(cr file.ColumnChunkReader, c *schema.Column, path string, row *int, fn func(document) (bool, error)) (bool, error) {
	br, ok := cr.(*file.ByteArrayColumnChunkReader)
	if !ok {
		return false, fmt.Errorf("%w: %s: column %s is not a byte-array column", ErrData, path, c.Path())
	}
	vals := make([]parquet.ByteArray, columnBatch)
	def := make([]int16, columnBatch)
	maxDef := c.MaxDefinitionLevel()
	for br.HasNext() {
		total, _, err := br.ReadBatch(columnBatch, vals, def, nil)
		if err != nil {
			return false, fmt.Errorf("%w: %s: column %s: %w", ErrData, path, c.Path(), err)
		}
		v := 0
		for i := range int(total) {
			d := document{isText: true, where: rowWhere(path, *row)}
			if maxDef == 0 || def[i] == maxDef {
				if len(vals[v]) > MaxLineBytes {
					return false, fmt.Errorf("%w: %w: %s: a row is longer than %d MiB", ErrData, ErrTooLarge, d.where, MaxLineBytes>>20)
				}
				d.text = string(vals[v])
				v++
			}
			d.blank = strings.TrimSpace(d.text) == ""
			*row++
			if stop, err := fn(d); err != nil || stop {
				return stop, err
			}
		}
		if total == 0 {
			break
		}
	}
	return false, nil
}

// parquetTokens reads a list<int32|int64> column chunk, one list per row (repetition level
// 0 starts a row); a null or empty list is a blank row.
func parquetTokens(cr file.ColumnChunkReader, c *schema.Column, path string, row *int, fn func(document) (bool, error)) (bool, error) {
	def := make([]int16, columnBatch)
	rep := make([]int16, columnBatch)
	maxDef := c.MaxDefinitionLevel()
	var cur []int64
	open := false
	emit := func() (bool, error) {
		d := document{ids: cur, blank: len(cur) == 0, where: rowWhere(path, *row)}
		*row++
		cur, open = nil, false
		return fn(d)
	}
	var i32 []int32
	var i64 []int64
	for cr.HasNext() {
		var total int64
		var err error
		switch r := cr.(type) {
		case *file.Int32ColumnChunkReader:
			if i32 == nil {
				i32 = make([]int32, columnBatch)
			}
			total, _, err = r.ReadBatch(columnBatch, i32, def, rep)
		case *file.Int64ColumnChunkReader:
			if i64 == nil {
				i64 = make([]int64, columnBatch)
			}
			total, _, err = r.ReadBatch(columnBatch, i64, def, rep)
		default:
			return false, fmt.Errorf("%w: %s: column %s is not an integer column", ErrData, path, c.Path())
		}
		if err != nil {
			return false, fmt.Errorf("%w: %s: column %s: %w", ErrData, path, c.Path(), err)
		}
		v := 0
		for i := range int(total) {
			if rep[i] == 0 && open {
				if stop, err := emit(); err != nil || stop {
					return stop, err
				}
			}
			open = true
			if def[i] == maxDef {
				if i32 != nil {
					cur = append(cur, int64(i32[v]))
				} else {
					cur = append(cur, i64[v])
				}
				v++
			}
		}
		if total == 0 {
			break
		}
	}
	if open {
		return emit()
	}
	return false, nil
}

// arrowDocuments calls fn for every row of the text column (or the token column) of an
// Arrow IPC file or stream.
func arrowDocuments(ctx context.Context, path string, format DataFormat, col string, fn func(document) (bool, error)) (err error) {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("model: read data: %w", err)
	}
	defer f.Close()
	defer recoverReader(path, &err)
	alloc := ipc.WithAllocator(newCappedAllocator(f))
	bad := func(err error) error {
		return fmt.Errorf("%w: %s: not a readable Arrow IPC %s: %w", ErrData, path, strings.TrimPrefix(string(format), "arrow-"), err)
	}
	var sch *arrow.Schema
	var next func() (arrow.Record, error) // nil, nil at the end
	if format == FormatArrowFile {
		r, err := ipc.NewFileReader(f, alloc)
		if err != nil {
			return bad(err)
		}
		defer r.Close()
		sch = r.Schema()
		i := 0
		next = func() (arrow.Record, error) {
			if i >= r.NumRecords() {
				return nil, nil
			}
			rec, err := r.RecordAt(i) // the caller releases it
			i++
			return rec, err
		}
	} else {
		r, err := ipc.NewReader(f, alloc)
		if err != nil {
			return bad(err)
		}
		defer r.Release()
		sch = r.Schema()
		next = func() (arrow.Record, error) {
			if !r.Next() {
				return nil, r.Err()
			}
			rec := r.Record()
			rec.Retain()
			return rec, nil
		}
	}
	idx, isText := -1, false
	var names []string
	for i, fd := range sch.Fields() {
		names = append(names, fd.Name)
		switch {
		case fd.Name == col:
			if fd.Type.ID() != arrow.STRING && fd.Type.ID() != arrow.LARGE_STRING {
				return fmt.Errorf("%w: %s: column %q is %s, not a string column", ErrData, path, col, fd.Type)
			}
			idx, isText = i, true
		case idx < 0 && fd.Name == TokenColumn:
			lt, ok := fd.Type.(arrow.ListLikeType)
			if !ok || !isIntegerType(lt.Elem()) {
				return fmt.Errorf("%w: %s: column %q is %s, not a list of integers", ErrData, path, TokenColumn, fd.Type)
			}
			idx = i
		}
	}
	if idx < 0 {
		return missingColumn(path, col, names)
	}
	row := 0
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		rec, err := next()
		if err != nil {
			return bad(err)
		}
		if rec == nil {
			return nil
		}
		stop, err := arrowRows(rec.Column(idx), isText, path, &row, fn)
		rec.Release()
		if err != nil || stop {
			return err
		}
	}
}

func isIntegerType(t arrow.DataType) bool {
	switch t.ID() {
	case arrow.INT8, arrow.INT16, arrow.INT32, arrow.INT64, arrow.UINT8, arrow.UINT16, arrow.UINT32, arrow.UINT64:
		return true
	}
	return false
}

// arrowRows calls fn for every row of one column of a record batch.
func arrowRows(a arrow.Array, isText bool, path string, row *int, fn func(document) (bool, error)) (bool, error) {
	str := func(i int) string { return "" }
	var ints func(lo, hi int64) ([]int64, error)
	var offsets func(i int) (int64, int64)
	switch c := a.(type) {
	case *array.String:
		str = c.Value
	case *array.LargeString:
		str = c.Value
	case array.ListLike:
		offsets = c.ValueOffsets
		get, err := integerGetter(c.ListValues())
		if err != nil {
			return false, fmt.Errorf("%w: %s: column %s: %w", ErrData, path, TokenColumn, err)
		}
		ints = func(lo, hi int64) ([]int64, error) {
			ids := make([]int64, 0, hi-lo)
			for j := lo; j < hi; j++ {
				v, err := get(int(j))
				if err != nil {
					return nil, err
				}
				ids = append(ids, v)
			}
			return ids, nil
		}
	default:
		return false, fmt.Errorf("%w: %s: unexpected column array %T", ErrData, path, a)
	}
	for i := range a.Len() {
		d := document{isText: isText, where: rowWhere(path, *row)}
		*row++
		switch {
		case a.IsNull(i):
		case isText:
			d.text = str(i)
			if len(d.text) > MaxLineBytes {
				return false, fmt.Errorf("%w: %w: %s: a row is longer than %d MiB", ErrData, ErrTooLarge, d.where, MaxLineBytes>>20)
			}
		default:
			lo, hi := offsets(i)
			ids, err := ints(lo, hi)
			if err != nil {
				return false, fmt.Errorf("%w: %s: %w", ErrData, d.where, err)
			}
			d.ids = ids
		}
		d.blank = (isText && strings.TrimSpace(d.text) == "") || (!isText && len(d.ids) == 0)
		if stop, err := fn(d); err != nil || stop {
			return stop, err
		}
	}
	return false, nil
}

// errNullID is returned for a null element inside an input_ids list.
var errNullID = errors.New("a null token id")

// integerGetter returns a function reading element j of an integer array as int64.
func integerGetter(a arrow.Array) (func(j int) (int64, error), error) {
	wrap := func(f func(int) int64) func(int) (int64, error) {
		return func(j int) (int64, error) {
			if a.IsNull(j) {
				return 0, errNullID
			}
			return f(j), nil
		}
	}
	switch c := a.(type) {
	case *array.Int8:
		return wrap(func(j int) int64 { return int64(c.Value(j)) }), nil
	case *array.Int16:
		return wrap(func(j int) int64 { return int64(c.Value(j)) }), nil
	case *array.Int32:
		return wrap(func(j int) int64 { return int64(c.Value(j)) }), nil
	case *array.Int64:
		return wrap(func(j int) int64 { return c.Value(j) }), nil
	case *array.Uint8:
		return wrap(func(j int) int64 { return int64(c.Value(j)) }), nil
	case *array.Uint16:
		return wrap(func(j int) int64 { return int64(c.Value(j)) }), nil
	case *array.Uint32:
		return wrap(func(j int) int64 { return int64(c.Value(j)) }), nil
	case *array.Uint64:
		return wrap(func(j int) int64 {
			v := c.Value(j)
			if v > 1<<62 {
				return -1 // outside every vocabulary: reported by the range check
			}
			return int64(v)
		}), nil
	}
	return nil, fmt.Errorf("list elements of type %s are not integers", a.DataType())
}
