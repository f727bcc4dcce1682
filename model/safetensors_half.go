package model

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"runtime"
	"unsafe"

	"linearpatch/model/tensor"
)

// Half-precision tensors stay two bytes per weight in memory: the loader asks a source for
// a tensor's stored bits (readHalf) before falling back to a float32 copy (ReadTensor).
// A safetensors file hands out slices of its read-only memory mapping, so weights are
// paged in from the file as they are used and cost no heap.

// halfReader is implemented by sources that can return a BF16 or F16 tensor without
// widening it. readHalf returns ok == false, and no error, for a tensor stored in another
// dtype (the caller then uses ReadTensor). owner must be kept reachable as long as data is
// used (tensor.FromHalf takes it). Errors are those of ReadTensor.
type halfReader interface {
	readHalf(name string) (dt tensor.DType, data []uint16, owner any, ok bool, err error)
}

// dtyper is implemented by sources that know a tensor's stored dtype without reading it.
type dtyper interface {
	DType(name string) (string, bool)
}

// nativeLittleEndian: mapped bytes can be used as uint16 values in place only on a
// little-endian machine (safetensors is little-endian).
var nativeLittleEndian = binary.NativeEndian.Uint16([]byte{1, 0}) == 1

// fileMapping is a read-only mapping of a whole file, unmapped by a cleanup once neither
// the SafetensorsFile nor any matrix built on it is reachable.
type fileMapping struct {
	data []byte
}

// newFileMapping maps f, or returns nil when the platform or the file does not allow it.
func newFileMapping(f *os.File, size int64) *fileMapping {
	data, unmap, err := mapFile(f, size)
	if err != nil {
		return nil
	}
	m := &fileMapping{data: data}
	runtime.AddCleanup(m, func(b []byte) { unmap(b) }, data)
	return m
}

// readHalf returns a BF16 or F16 tensor's bits: a slice of the file's mapping when the file
// is mapped, the machine is little-endian and the tensor is 2-byte aligned, else a copy
// read from the file (two bytes per value either way).
func (s *SafetensorsFile) readHalf(name string) (tensor.DType, []uint16, any, bool, error) {
	if s.closed.Load() {
		return 0, nil, nil, false, fmt.Errorf("model: read tensor %q from %s: %w", name, s.path, fs.ErrClosed)
	}
	t, ok := s.tensors[name]
	if !ok {
		return 0, nil, nil, false, fmt.Errorf("%w: %q in %s", ErrTensorNotFound, name, s.path)
	}
	dt, _ := tensor.ParseDType(t.dtype) // validated when the header was read
	if dt == tensor.F32 {
		return 0, nil, nil, false, nil
	}
	n := int((t.end - t.begin) / 2)
	if n == 0 {
		return dt, []uint16{}, nil, true, nil
	}
	if mp := s.mapping; mp != nil && nativeLittleEndian && t.begin%2 == 0 && t.end <= int64(len(mp.data)) {
		return dt, unsafe.Slice((*uint16)(unsafe.Pointer(&mp.data[t.begin])), n), mp, true, nil
	}
	out := make([]uint16, n)
	buf := unsafe.Slice((*byte)(unsafe.Pointer(&out[0])), 2*n)
	if err := readFullAt(s.r, buf, t.begin); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return 0, nil, nil, false, fmt.Errorf("%w: %s: tensor %q: %w (file changed after open?)", ErrSafetensors, s.path, name, err)
		}
		return 0, nil, nil, false, fmt.Errorf("model: read tensor %q from %s: %w", name, s.path, err)
	}
	if !nativeLittleEndian {
		for i := range out {
			out[i] = binary.LittleEndian.Uint16(buf[2*i:])
		}
	}
	return dt, out, nil, true, nil
}

func (d *safetensorsDir) readHalf(name string) (tensor.DType, []uint16, any, bool, error) {
	s, err := d.shardOf(name)
	if err != nil {
		return 0, nil, nil, false, err
	}
	return s.readHalf(name)
}

// DType returns the named tensor's on-disk dtype, opening its shard if needed.
func (d *safetensorsDir) DType(name string) (string, bool) {
	s, err := d.shardOf(name)
	if err != nil {
		return "", false
	}
	return s.DType(name)
}

// readHalf records name when the wrapped source returns the tensor's bits (or an error);
// a tensor it declines is recorded by the ReadTensor call that follows.
func (r *RecordingSource) readHalf(name string) (tensor.DType, []uint16, any, bool, error) {
	hr, ok := r.src.(halfReader)
	if !ok {
		return 0, nil, nil, false, nil
	}
	dt, data, owner, ok, err := hr.readHalf(name)
	if ok || err != nil {
		r.mu.Lock()
		r.read = append(r.read, name)
		r.mu.Unlock()
	}
	return dt, data, owner, ok, err
}

// DType forwards to the wrapped source when it knows dtypes.
func (r *RecordingSource) DType(name string) (string, bool) {
	if dt, ok := r.src.(dtyper); ok {
		return dt.DType(name)
	}
	return "", false
}
