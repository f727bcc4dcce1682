package model

import (
	"bufio"
	"bytes"
	"cmp"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"

	"linearpatch/internal/atomicfile"
	"linearpatch/model/tensor"
)

// ErrSafetensors is wrapped by every error about a malformed or unsupported safetensors file
// (or index), and by WriteSafetensors when asked to write tensors that cannot form one.
var ErrSafetensors = errors.New("model: bad safetensors file")

// ErrTensorNotFound is wrapped by ReadTensor when a source holds no tensor of that name.
var ErrTensorNotFound = errors.New("model: tensor not found")

// maxSafetensorsHeader bounds the JSON header: real headers are a few hundred KiB, and a
// larger length prefix means a corrupt or hostile file, not one worth allocating for.
const maxSafetensorsHeader = 100 << 20

// TensorSource yields named tensors as float32. Returned slices are owned by the caller.
//
// Shape reports a tensor's dimensions without reading its data (false: no such tensor, or
// its shard could not be opened; ReadTensor then says why). ReadTensor returns the data in
// row-major order and the shape; it wraps ErrTensorNotFound for an unknown name, the
// format's sentinel (ErrSafetensors) for bad data, and fs.ErrClosed after Close.
// Implementations in this package are safe for concurrent use except that Close must not
// race with the other methods.
type TensorSource interface {
	Shape(name string) ([]int, bool)
	ReadTensor(name string) ([]float32, []int, error)
	Close() error
}

// stDTypeSize returns the byte size of the safetensors dtypes this package supports.
func stDTypeSize(dtype string) (int, bool) {
	switch dtype {
	case "F32":
		return 4, true
	case "F16", "BF16":
		return 2, true
	}
	return 0, false
}

// stTensor locates one tensor of a safetensors file.
type stTensor struct {
	dtype      string
	shape      []int
	begin, end int64 // absolute byte offsets in the file
}

// SafetensorsFile is an open safetensors file whose header has been read and validated.
// ReadTensor reads float32 copies on demand with ReadAt. The file is also memory-mapped
// read-only when the platform allows, so that half-precision tensors can be handed to the
// loader in place (see readHalf in safetensors_half.go); the mapping outlives Close for as
// long as a matrix uses it. It implements TensorSource and is safe for concurrent reads.
type SafetensorsFile struct {
	path    string
	r       io.ReaderAt
	c       io.Closer // nil when r needs no closing
	tensors map[string]stTensor
	meta    map[string]string
	closed  atomic.Bool
	mapping *fileMapping // nil when the file is not mapped
}

// OpenSafetensors opens path and validates its header: the length prefix, the JSON, every
// tensor's dtype (F32, F16 or BF16), shape and data_offsets against the file size. It reads
// only the header. Errors about the file's content wrap ErrSafetensors and name the path.
func OpenSafetensors(path string) (*SafetensorsFile, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("model: open safetensors: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("model: open safetensors: %w", err)
	}
	if st.IsDir() {
		f.Close()
		return nil, fmt.Errorf("%w: %s: is a directory", ErrSafetensors, path)
	}
	s, err := newSafetensors(path, f, st.Size())
	if err != nil {
		f.Close()
		return nil, err
	}
	s.c = f
	for _, t := range s.tensors {
		if t.dtype != "F32" { // only half-precision tensors are used in place
			s.mapping = newFileMapping(f, st.Size()) // nil when it cannot be mapped: reads then copy
			break
		}
	}
	return s, nil
}

// stHeaderEntry is one tensor's entry in the JSON header.
type stHeaderEntry struct {
	DType   string  `json:"dtype"`
	Shape   []int64 `json:"shape"`
	Offsets []int64 `json:"data_offsets"`
}

// newSafetensors parses and validates the header of a size-byte safetensors image read
// through r; path only labels errors.
func newSafetensors(path string, r io.ReaderAt, size int64) (*SafetensorsFile, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s: "+format, append([]any{ErrSafetensors, path}, args...)...)
	}
	if size < 8 {
		return nil, bad("file is %d bytes, shorter than the 8-byte header length", size)
	}
	var prefix [8]byte
	if err := readFullAt(r, prefix[:], 0); err != nil {
		return nil, fmt.Errorf("model: read safetensors %s: %w", path, err)
	}
	n := binary.LittleEndian.Uint64(prefix[:])
	switch {
	case n > maxSafetensorsHeader:
		return nil, bad("header length %d exceeds the %d-byte limit", n, maxSafetensorsHeader)
	case n > uint64(size-8):
		return nil, bad("header length %d exceeds the %d bytes that follow it (truncated file?)", n, size-8)
	}
	hdr := make([]byte, n)
	if err := readFullAt(r, hdr, 8); err != nil {
		return nil, fmt.Errorf("model: read safetensors %s: %w", path, err)
	}
	dataStart := 8 + int64(n)
	dataLen := size - dataStart

	if t := bytes.TrimLeft(hdr, " \t\r\n"); len(t) == 0 || t[0] != '{' {
		return nil, bad("header is not a JSON object")
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(hdr, &raw); err != nil {
		return nil, bad("malformed JSON header: %w", err)
	}
	s := &SafetensorsFile{path: path, r: r, tensors: make(map[string]stTensor, len(raw))}
	names := make([]string, 0, len(raw))
	for name := range raw {
		names = append(names, name)
	}
	sort.Strings(names) // deterministic error messages
	for _, name := range names {
		if name == "__metadata__" {
			if err := json.Unmarshal(raw[name], &s.meta); err != nil {
				return nil, bad("__metadata__ must map strings to strings: %w", err)
			}
			continue
		}
		var e stHeaderEntry
		if err := json.Unmarshal(raw[name], &e); err != nil {
			return nil, bad("tensor %q: malformed entry: %w", name, err)
		}
		esize, ok := stDTypeSize(e.DType)
		switch {
		case e.DType == "":
			return nil, bad("tensor %q: missing dtype", name)
		case !ok:
			return nil, bad("tensor %q: dtype %s unsupported (want F32, F16 or BF16)", name, e.DType)
		case e.Shape == nil:
			return nil, bad("tensor %q: missing shape", name)
		case len(e.Offsets) != 2:
			return nil, bad("tensor %q: data_offsets must be [begin, end], got %v", name, e.Offsets)
		}
		begin, end := e.Offsets[0], e.Offsets[1]
		switch {
		case begin < 0 || end < begin:
			return nil, bad("tensor %q: data_offsets [%d, %d] are not 0 <= begin <= end", name, begin, end)
		case end > dataLen:
			return nil, bad("tensor %q: data_offsets end %d lies beyond the %d-byte data buffer (truncated file?)", name, end, dataLen)
		}
		nbytes := end - begin
		elems, zero, over := int64(1), false, false
		for _, d := range e.Shape {
			if d < 0 {
				return nil, bad("tensor %q: negative dimension in shape %v", name, e.Shape)
			}
			zero = zero || d == 0
		}
		if zero {
			elems = 0
		} else {
			maxElems := math.MaxInt64 / int64(esize)
			for _, d := range e.Shape {
				if elems > maxElems/d {
					over = true
					break
				}
				elems *= d
			}
		}
		if over || elems*int64(esize) != nbytes {
			need := strconv.FormatInt(elems*int64(esize), 10)
			if over {
				need = "more than " + strconv.FormatInt(math.MaxInt64, 10)
			}
			return nil, bad("tensor %q: shape %v of %s needs %s bytes but data_offsets [%d, %d] span %d",
				name, e.Shape, e.DType, need, begin, end, nbytes)
		}
		shape := make([]int, len(e.Shape))
		for i, d := range e.Shape {
			if d > math.MaxInt32 { // only possible alongside a zero dimension
				return nil, bad("tensor %q: dimension %d in shape %v is absurd", name, d, e.Shape)
			}
			shape[i] = int(d)
		}
		s.tensors[name] = stTensor{dtype: e.DType, shape: shape, begin: dataStart + begin, end: dataStart + end}
	}
	if err := stCheckOverlap(s.tensors, dataStart, bad); err != nil {
		return nil, err
	}
	return s, nil
}

// stCheckOverlap reports two non-empty tensors whose byte ranges overlap.
func stCheckOverlap(ts map[string]stTensor, dataStart int64, bad func(string, ...any) error) error {
	type span struct {
		name       string
		begin, end int64
	}
	spans := make([]span, 0, len(ts))
	for name, t := range ts {
		if t.end > t.begin {
			spans = append(spans, span{name, t.begin, t.end})
		}
	}
	slices.SortFunc(spans, func(a, b span) int {
		if a.begin != b.begin {
			return cmp.Compare(a.begin, b.begin)
		}
		if a.end != b.end {
			return cmp.Compare(a.end, b.end)
		}
		return cmp.Compare(a.name, b.name)
	})
	for i := 1; i < len(spans); i++ {
		p, c := spans[i-1], spans[i]
		if c.begin < p.end {
			return bad("tensors %q [%d, %d] and %q [%d, %d] overlap", p.name, p.begin-dataStart, p.end-dataStart,
				c.name, c.begin-dataStart, c.end-dataStart)
		}
	}
	return nil
}

// readFullAt fills buf from r at off; a short read is io.ErrUnexpectedEOF.
func readFullAt(r io.ReaderAt, buf []byte, off int64) error {
	n, err := r.ReadAt(buf, off)
	if n == len(buf) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// Path returns the file's path as given to OpenSafetensors.
func (s *SafetensorsFile) Path() string { return s.path }

// Names returns the tensor names in sorted order (a new slice; __metadata__ excluded).
func (s *SafetensorsFile) Names() []string {
	names := make([]string, 0, len(s.tensors))
	for n := range s.tensors {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Shape returns a copy of the named tensor's shape, or false if there is no such tensor.
func (s *SafetensorsFile) Shape(name string) ([]int, bool) {
	t, ok := s.tensors[name]
	if !ok {
		return nil, false
	}
	return slices.Clone(t.shape), true
}

// DType returns the named tensor's on-disk dtype ("F32", "F16" or "BF16").
func (s *SafetensorsFile) DType(name string) (string, bool) {
	t, ok := s.tensors[name]
	return t.dtype, ok
}

// Metadata returns a copy of the header's __metadata__ map (nil when absent).
func (s *SafetensorsFile) Metadata() map[string]string {
	if s.meta == nil {
		return nil
	}
	m := make(map[string]string, len(s.meta))
	for k, v := range s.meta {
		m[k] = v
	}
	return m
}

// ReadTensor reads the named tensor and converts it to float32 exactly (F16 and BF16 widen
// without rounding). The returned slices are new and owned by the caller. It wraps
// ErrTensorNotFound for an unknown name, fs.ErrClosed after Close, and ErrSafetensors
// together with io.ErrUnexpectedEOF when the file was truncated after it was opened.
func (s *SafetensorsFile) ReadTensor(name string) ([]float32, []int, error) {
	if s.closed.Load() {
		return nil, nil, fmt.Errorf("model: read tensor %q from %s: %w", name, s.path, fs.ErrClosed)
	}
	t, ok := s.tensors[name]
	if !ok {
		return nil, nil, fmt.Errorf("%w: %q in %s", ErrTensorNotFound, name, s.path)
	}
	buf := make([]byte, t.end-t.begin)
	if err := readFullAt(s.r, buf, t.begin); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, nil, fmt.Errorf("%w: %s: tensor %q: %w (file changed after open?)", ErrSafetensors, s.path, name, err)
		}
		return nil, nil, fmt.Errorf("model: read tensor %q from %s: %w", name, s.path, err)
	}
	return stDecode(t.dtype, buf), slices.Clone(t.shape), nil
}

// Close closes the file. Later ReadTensor calls fail with an error wrapping fs.ErrClosed.
func (s *SafetensorsFile) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	s.mapping = nil // unmapped once no matrix holds it either
	if s.c != nil {
		return s.c.Close()
	}
	return nil
}

// stDecode converts little-endian values of a supported dtype to float32.
func stDecode(dtype string, b []byte) []float32 {
	switch dtype {
	case "F32":
		out := make([]float32, len(b)/4)
		for i := range out {
			out[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
		}
		return out
	case "F16":
		out := make([]float32, len(b)/2)
		for i := range out {
			out[i] = tensor.Float16ToFloat32(binary.LittleEndian.Uint16(b[2*i:]))
		}
		return out
	case "BF16":
		out := make([]float32, len(b)/2)
		for i := range out {
			out[i] = tensor.BFloat16ToFloat32(binary.LittleEndian.Uint16(b[2*i:]))
		}
		return out
	}
	panic("model: stDecode: unsupported dtype " + dtype) // validated when the header was read
}

// NamedTensor is one tensor to write: row-major Data of the given Shape (len(Data) must be
// the product of Shape; an empty Shape is a scalar). DType selects the on-disk type: "" or
// "F32", or "F16" / "BF16" (rounded to nearest even). Half, when non-nil, replaces Data:
// the tensor's F16 or BF16 bits (DType must name which), written unchanged.
type NamedTensor struct {
	Name  string
	Shape []int
	Data  []float32
	DType string
	Half  []uint16
}

// WriteSafetensors writes tensors, in the given order, and metadata as a safetensors file.
// The header is padded with spaces to a multiple of 8 bytes, so tensor data is 8-aligned.
// The write is atomic: data goes to a temporary file in path's directory, which is synced
// and renamed over path; on error path is untouched and the temporary file removed. Invalid
// tensors (duplicate or reserved names, unknown dtype, negative dimensions, len(Data) not
// matching Shape) give an error wrapping ErrSafetensors; I/O errors are wrapped as they are.
func WriteSafetensors(path string, tensors []NamedTensor, metadata map[string]string) error {
	header, err := stHeader(path, tensors, metadata)
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFunc(path, 0o644, func(w io.Writer) error { return stWriteBody(w, header, tensors) }); err != nil {
		return fmt.Errorf("model: safetensors: %w", err)
	}
	return nil
}

// stHeader validates tensors and returns the padded JSON header.
func stHeader(path string, tensors []NamedTensor, metadata map[string]string) ([]byte, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: write %s: "+format, append([]any{ErrSafetensors, path}, args...)...)
	}
	var h bytes.Buffer
	h.WriteByte('{')
	if len(metadata) > 0 {
		mb, err := json.Marshal(metadata)
		if err != nil {
			return nil, bad("metadata: %w", err)
		}
		h.WriteString(`"__metadata__":`)
		h.Write(mb)
	}
	seen := make(map[string]bool, len(tensors))
	var off int64
	for _, t := range tensors {
		dtype := t.DType
		if dtype == "" {
			dtype = "F32"
		}
		esize, ok := stDTypeSize(dtype)
		switch {
		case !ok:
			return nil, bad("tensor %q: dtype %q unsupported (want F32, F16 or BF16)", t.Name, t.DType)
		case t.Name == "__metadata__":
			return nil, bad("tensor name %q is reserved", t.Name)
		case seen[t.Name]:
			return nil, bad("tensor %q appears twice", t.Name)
		}
		seen[t.Name] = true
		have := len(t.Data)
		if t.Half != nil {
			if dtype != "F16" && dtype != "BF16" {
				return nil, bad("tensor %q: half-precision bits with dtype %q", t.Name, dtype)
			}
			if t.Data != nil {
				return nil, bad("tensor %q: both float32 values and half-precision bits", t.Name)
			}
			have = len(t.Half)
		}
		n, ok := stElems(t.Shape, have)
		if !ok || n != have {
			return nil, bad("tensor %q: %d values for shape %v", t.Name, have, t.Shape)
		}
		name, _ := json.Marshal(t.Name) // marshalling a string cannot fail
		shape := t.Shape
		if shape == nil {
			shape = []int{}
		}
		sb, _ := json.Marshal(shape)
		if h.Len() > 1 {
			h.WriteByte(',')
		}
		end := off + int64(n)*int64(esize)
		fmt.Fprintf(&h, `%s:{"dtype":"%s","shape":%s,"data_offsets":[%d,%d]}`, name, dtype, sb, off, end)
		off = end
	}
	h.WriteByte('}')
	for h.Len()%8 != 0 {
		h.WriteByte(' ')
	}
	return h.Bytes(), nil
}

// stElems returns the product of shape, or false if a dimension is negative or the product
// exceeds limit (so it cannot overflow).
func stElems(shape []int, limit int) (int, bool) {
	n := 1
	for _, d := range shape {
		if d < 0 {
			return 0, false
		}
		if d == 0 {
			n = 0
		}
	}
	if n == 0 {
		return 0, true
	}
	for _, d := range shape {
		if n > limit/d {
			return 0, false
		}
		n *= d
	}
	return n, true
}

// stWriteBody writes the length prefix, the header and every tensor's data to w.
func stWriteBody(w io.Writer, header []byte, tensors []NamedTensor) error {
	bw := bufio.NewWriterSize(w, 1<<20)
	var prefix [8]byte
	binary.LittleEndian.PutUint64(prefix[:], uint64(len(header)))
	bw.Write(prefix[:])
	bw.Write(header)
	var buf [4]byte
	for _, t := range tensors {
		if t.Half != nil {
			for _, v := range t.Half {
				binary.LittleEndian.PutUint16(buf[:], v)
				bw.Write(buf[:2])
			}
			continue
		}
		switch t.DType {
		case "", "F32":
			for _, v := range t.Data {
				binary.LittleEndian.PutUint32(buf[:], math.Float32bits(v))
				bw.Write(buf[:4])
			}
		case "F16":
			for _, v := range t.Data {
				binary.LittleEndian.PutUint16(buf[:], tensor.Float32ToFloat16(v))
				bw.Write(buf[:2])
			}
		case "BF16":
			for _, v := range t.Data {
				binary.LittleEndian.PutUint16(buf[:], tensor.Float32ToBFloat16(v))
				bw.Write(buf[:2])
			}
		}
	}
	return bw.Flush() // bufio keeps the first write error and returns it here
}

// OpenSafetensorsDir opens the weights of a Hugging Face model directory: model.safetensors
// when present (returned as a *SafetensorsFile), else model.safetensors.index.json, whose
// {"weight_map": {tensor: shard}} is read at once while each shard is opened only when a
// tensor in it is first asked for. Shard names must be local paths inside dir. A directory
// with neither file gives an error wrapping both ErrSafetensors and fs.ErrNotExist.
func OpenSafetensorsDir(dir string) (TensorSource, error) {
	single := filepath.Join(dir, "model.safetensors")
	if _, err := os.Stat(single); err == nil {
		return OpenSafetensors(single)
	}
	index := filepath.Join(dir, "model.safetensors.index.json")
	b, err := os.ReadFile(index)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s: neither model.safetensors nor model.safetensors.index.json: %w", ErrSafetensors, dir, fs.ErrNotExist)
	}
	if err != nil {
		return nil, fmt.Errorf("model: open safetensors index: %w", err)
	}
	var idx struct {
		WeightMap map[string]string `json:"weight_map"`
	}
	if err := json.Unmarshal(b, &idx); err != nil {
		return nil, fmt.Errorf("%w: %s: malformed JSON: %w", ErrSafetensors, index, err)
	}
	if len(idx.WeightMap) == 0 {
		return nil, fmt.Errorf("%w: %s: empty or missing weight_map", ErrSafetensors, index)
	}
	for name, shard := range idx.WeightMap {
		if !filepath.IsLocal(shard) {
			return nil, fmt.Errorf("%w: %s: tensor %q maps to shard %q outside the directory", ErrSafetensors, index, name, shard)
		}
	}
	return &safetensorsDir{dir: dir, index: index, weightMap: idx.WeightMap, shards: map[string]*SafetensorsFile{}}, nil
}

// safetensorsDir is a sharded checkpoint whose shards open lazily.
type safetensorsDir struct {
	dir, index string
	weightMap  map[string]string // tensor -> shard file name, read-only after open

	mu     sync.Mutex
	shards map[string]*SafetensorsFile // opened shards
	closed bool
}

// Names returns every tensor name of the index, sorted.
func (d *safetensorsDir) Names() []string {
	names := make([]string, 0, len(d.weightMap))
	for n := range d.weightMap {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// shard returns the open shard file, opening it on first use.
func (d *safetensorsDir) shard(file string) (*SafetensorsFile, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, fmt.Errorf("model: read %s: %w", d.dir, fs.ErrClosed)
	}
	if s, ok := d.shards[file]; ok {
		return s, nil
	}
	s, err := OpenSafetensors(filepath.Join(d.dir, file))
	if err != nil {
		return nil, err
	}
	d.shards[file] = s
	return s, nil
}

// Shape opens the tensor's shard header if needed; false when it cannot.
func (d *safetensorsDir) Shape(name string) ([]int, bool) {
	file, ok := d.weightMap[name]
	if !ok {
		return nil, false
	}
	s, err := d.shard(file)
	if err != nil {
		return nil, false
	}
	return s.Shape(name)
}

func (d *safetensorsDir) ReadTensor(name string) ([]float32, []int, error) {
	s, err := d.shardOf(name)
	if err != nil {
		return nil, nil, err
	}
	return s.ReadTensor(name)
}

// shardOf returns the open shard that holds name.
func (d *safetensorsDir) shardOf(name string) (*SafetensorsFile, error) {
	file, ok := d.weightMap[name]
	if !ok {
		return nil, fmt.Errorf("%w: %q in %s", ErrTensorNotFound, name, d.index)
	}
	s, err := d.shard(file)
	if err != nil {
		return nil, err
	}
	if _, ok := s.tensors[name]; !ok {
		return nil, fmt.Errorf("%w: %s: index maps tensor %q to %s, which lacks it", ErrSafetensors, d.index, name, file)
	}
	return s, nil
}

// Close closes every shard opened so far.
func (d *safetensorsDir) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed = true
	var errs []error
	for _, s := range d.shards {
		errs = append(errs, s.Close())
	}
	return errors.Join(errs...)
}

// memTensor is one tensor held in memory by a MapSource.
type memTensor struct {
	shape []int
	data  []float32
}

// MapSource is a TensorSource over tensors held in memory. ReadTensor hands out copies, so
// callers may modify what they get; the source keeps its own data.
type MapSource struct {
	tensors map[string]memTensor
	closed  atomic.Bool
}

// NewMapSource returns a source holding tensors. It takes ownership of each Data slice:
// the caller must not modify them afterwards. DType is ignored. It panics on a duplicate
// name or a len(Data) that does not match Shape (a caller bug).
func NewMapSource(tensors ...NamedTensor) *MapSource {
	m := &MapSource{tensors: make(map[string]memTensor, len(tensors))}
	for _, t := range tensors {
		if _, dup := m.tensors[t.Name]; dup {
			panic(fmt.Sprintf("model: NewMapSource: tensor %q appears twice", t.Name))
		}
		m.put(t.Name, t.Data, t.Shape...)
	}
	return m
}

// put stores data (not copied) under name; it panics if len(data) does not match shape.
func (m *MapSource) put(name string, data []float32, shape ...int) {
	if n, ok := stElems(shape, len(data)); !ok || n != len(data) {
		panic(fmt.Sprintf("model: MapSource: tensor %q: %d values for shape %v", name, len(data), shape))
	}
	m.tensors[name] = memTensor{shape: slices.Clone(shape), data: data}
}

// Names returns the tensor names in sorted order.
func (m *MapSource) Names() []string {
	names := make([]string, 0, len(m.tensors))
	for n := range m.tensors {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Shape returns a copy of the named tensor's shape, or false if there is none.
func (m *MapSource) Shape(name string) ([]int, bool) {
	t, ok := m.tensors[name]
	if !ok {
		return nil, false
	}
	return slices.Clone(t.shape), true
}

// ReadTensor returns a copy of the named tensor and its shape. It wraps ErrTensorNotFound
// for an unknown name and fs.ErrClosed after Close.
func (m *MapSource) ReadTensor(name string) ([]float32, []int, error) {
	if m.closed.Load() {
		return nil, nil, fmt.Errorf("model: read tensor %q: %w", name, fs.ErrClosed)
	}
	t, ok := m.tensors[name]
	if !ok {
		return nil, nil, fmt.Errorf("%w: %q", ErrTensorNotFound, name)
	}
	return slices.Clone(t.data), slices.Clone(t.shape), nil
}

// Close marks the source closed; later reads fail. The data is left to the garbage collector.
func (m *MapSource) Close() error {
	m.closed.Store(true)
	return nil
}

// RecordingSource wraps a TensorSource and records the name of every ReadTensor call, in
// call order, failed calls and repeats included (Shape calls are not recorded). It is safe
// for concurrent use.
type RecordingSource struct {
	src  TensorSource
	mu   sync.Mutex
	read []string
}

// NewRecordingSource returns a RecordingSource over src; closing it closes src.
func NewRecordingSource(src TensorSource) *RecordingSource { return &RecordingSource{src: src} }

// Shape forwards to the wrapped source without recording.
func (r *RecordingSource) Shape(name string) ([]int, bool) { return r.src.Shape(name) }

// ReadTensor records name and forwards to the wrapped source.
func (r *RecordingSource) ReadTensor(name string) ([]float32, []int, error) {
	r.mu.Lock()
	r.read = append(r.read, name)
	r.mu.Unlock()
	return r.src.ReadTensor(name)
}

// Close closes the wrapped source.
func (r *RecordingSource) Close() error { return r.src.Close() }

// Read returns a copy of the names passed to ReadTensor so far, in call order.
func (r *RecordingSource) Read() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.read)
}
