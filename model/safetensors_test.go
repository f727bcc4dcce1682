package model

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io/fs"
	"linearpatch/model/tensor"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// stImage returns a safetensors image with the given header JSON and data buffer.
func stImage(header string, data []byte) []byte {
	var b bytes.Buffer
	binary.Write(&b, binary.LittleEndian, uint64(len(header)))
	b.WriteString(header)
	b.Write(data)
	return b.Bytes()
}

func stWriteFile(t *testing.T, path string, b []byte) string {
	t.Helper()
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func stF32Bytes(vs ...float32) []byte {
	b := make([]byte, 4*len(vs))
	for i, v := range vs {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(v))
	}
	return b
}

func stRandFloats(rng *rand.Rand, n int) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = float32(rng.NormFloat64())
	}
	return v
}

func TestSafetensorsRoundtrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	dir := t.TempDir()
	path := filepath.Join(dir, "m.safetensors")
	halfs := []float32{0, 1, -2, 0.5, 65504, float32(math.Inf(-1)), 5.960464477539063e-08, 0.333251953125}
	in := []NamedTensor{
		{Name: "z.last", Shape: []int{3, 5}, Data: stRandFloats(rng, 15)},
		{Name: "a.first", Shape: []int{7}, Data: stRandFloats(rng, 7)},
		{Name: "scalar", Shape: []int{}, Data: []float32{42}},
		{Name: "empty", Shape: []int{0, 3}, Data: nil},
		{Name: "half", Shape: []int{2, 4}, Data: halfs, DType: "F16"},
		{Name: "brain", Shape: []int{2, 2}, Data: []float32{1, -3.140625, 1e30, 0}, DType: "BF16"},
		{Name: "odd", Shape: []int{1, 1, 3}, Data: stRandFloats(rng, 3), DType: "F16"},
	}
	meta := map[string]string{"format": "pt", "note": `quote " and <tag>`}
	if err := WriteSafetensors(path, in, meta); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	n := binary.LittleEndian.Uint64(b)
	if n%8 != 0 {
		t.Errorf("header length %d is not a multiple of 8", n)
	}
	// Tensors lie in the data buffer in the order given.
	var hdr map[string]json.RawMessage
	if err := json.Unmarshal(b[8:8+n], &hdr); err != nil {
		t.Fatal(err)
	}
	prevEnd := int64(0)
	for _, nt := range in {
		var e stHeaderEntry
		json.Unmarshal(hdr[nt.Name], &e)
		if e.Offsets[0] != prevEnd {
			t.Errorf("%s starts at %d, want %d (given order)", nt.Name, e.Offsets[0], prevEnd)
		}
		prevEnd = e.Offsets[1]
	}
	if int64(len(b))-8-int64(n) != prevEnd {
		t.Errorf("data buffer is %d bytes, want %d", int64(len(b))-8-int64(n), prevEnd)
	}

	f, err := OpenSafetensors(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	want := []string{"a.first", "brain", "empty", "half", "odd", "scalar", "z.last"}
	if got := f.Names(); !slices.Equal(got, want) {
		t.Errorf("Names() = %v, want %v", got, want)
	}
	if got := f.Metadata(); len(got) != 2 || got["format"] != "pt" || got["note"] != meta["note"] {
		t.Errorf("Metadata() = %v, want %v", got, meta)
	}
	for _, nt := range in {
		data, shape, err := f.ReadTensor(nt.Name)
		if err != nil {
			t.Fatalf("%s: %v", nt.Name, err)
		}
		if s, ok := f.Shape(nt.Name); !ok || !slices.Equal(s, nt.Shape) || !slices.Equal(shape, nt.Shape) {
			t.Errorf("%s: shape %v / %v, want %v", nt.Name, s, shape, nt.Shape)
		}
		if dt, _ := f.DType(nt.Name); dt != stOr(nt.DType, "F32") {
			t.Errorf("%s: dtype %s, want %s", nt.Name, dt, stOr(nt.DType, "F32"))
		}
		if len(data) != len(nt.Data) {
			t.Fatalf("%s: %d values, want %d", nt.Name, len(data), len(nt.Data))
		}
		for i, v := range nt.Data {
			w := v
			switch nt.DType {
			case "F16":
				w = tensor.Float16ToFloat32(tensor.Float32ToFloat16(v))
			case "BF16":
				w = tensor.BFloat16ToFloat32(tensor.Float32ToBFloat16(v))
			}
			if math.Float32bits(data[i]) != math.Float32bits(w) {
				t.Errorf("%s[%d] = %v, want %v", nt.Name, i, data[i], w)
			}
		}
	}
	// The values chosen for "half" are exact in F16.
	data, _, _ := f.ReadTensor("half")
	if !slices.Equal(data, halfs) {
		t.Errorf("half = %v, want %v", data, halfs)
	}
	// Returned slices are the caller's.
	data[0] = 99
	again, _, _ := f.ReadTensor("half")
	if again[0] != 0 {
		t.Error("ReadTensor returned shared storage")
	}
	if _, _, err := f.ReadTensor("nope"); !errors.Is(err, ErrTensorNotFound) {
		t.Errorf("unknown tensor: %v, want ErrTensorNotFound", err)
	}
	if _, ok := f.Shape("nope"); ok {
		t.Error("Shape(nope) reported a tensor")
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := f.ReadTensor("a.first"); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("read after Close: %v, want fs.ErrClosed", err)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Errorf("directory holds %d entries after the write, want only the file", len(ents))
	}
}

func stOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

func TestSafetensorsWriteReplacesAtomically(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "m.safetensors")
	if err := WriteSafetensors(path, []NamedTensor{{Name: "x", Shape: []int{2}, Data: []float32{1, 2}}}, nil); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(path)
	bad := [][]NamedTensor{
		{{Name: "x", Shape: []int{3}, Data: []float32{1, 2}}},
		{{Name: "x", Shape: []int{-1, -2}, Data: []float32{1, 2}}},
		{{Name: "x", Shape: []int{1 << 40, 1 << 40}, Data: []float32{1, 2}}},
		{{Name: "x", Shape: []int{2}, Data: []float32{1, 2}}, {Name: "x", Shape: []int{1}, Data: []float32{1}}},
		{{Name: "__metadata__", Shape: []int{1}, Data: []float32{1}}},
		{{Name: "x", Shape: []int{1}, Data: []float32{1}, DType: "I8"}},
	}
	for i, ts := range bad {
		err := WriteSafetensors(path, ts, nil)
		if !errors.Is(err, ErrSafetensors) || !strings.Contains(err.Error(), path) {
			t.Errorf("case %d: err = %v, want ErrSafetensors naming %s", i, err, path)
		}
	}
	after, _ := os.ReadFile(path)
	if !bytes.Equal(before, after) {
		t.Error("a failed write changed the file")
	}
	if err := WriteSafetensors(path, []NamedTensor{{Name: "y", Shape: []int{1}, Data: []float32{3}}}, nil); err != nil {
		t.Fatal(err)
	}
	f, err := OpenSafetensors(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if got := f.Names(); !slices.Equal(got, []string{"y"}) {
		t.Errorf("after rewrite Names() = %v", got)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Errorf("%d directory entries, want 1 (temporary files left behind?)", len(ents))
	}
	if err := WriteSafetensors(filepath.Join(dir, "missing", "m.safetensors"), nil, nil); err == nil {
		t.Error("write into a missing directory succeeded")
	}
}

func TestSafetensorsBadInput(t *testing.T) {
	one := stF32Bytes(1)
	okEntry := `"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}`
	big := make([]byte, 8)
	binary.LittleEndian.PutUint64(big, 200<<20)
	cases := []struct {
		name  string
		image []byte
		want  []string // substrings the message must hold besides the path
	}{
		{"empty file", nil, []string{"shorter than the 8-byte"}},
		{"short file", []byte{1, 2, 3, 4, 5}, []string{"shorter than the 8-byte"}},
		{"absurd header length", append(big, []byte("{}")...), []string{"exceeds the"}},
		{"header longer than file", stImage(`{}`, nil)[:9], []string{"truncated"}},
		{"zero header", stImage(``, nil), []string{"not a JSON object"}},
		{"not an object", stImage(`[1, 2]`, nil), []string{"not a JSON object"}},
		{"malformed JSON", stImage(`{"w":{"dtype":"F32",`, one), []string{"malformed JSON"}},
		{"entry not an object", stImage(`{"w":5}`, one), []string{`"w"`, "malformed entry"}},
		{"I8 dtype", stImage(`{"w":{"dtype":"I8","shape":[4],"data_offsets":[0,4]}}`, one), []string{"I8", `"w"`}},
		{"F64 dtype", stImage(`{"w":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}}`, stF32Bytes(1, 2)), []string{"F64", `"w"`}},
		{"missing dtype", stImage(`{"w":{"shape":[1],"data_offsets":[0,4]}}`, one), []string{"missing dtype"}},
		{"missing shape", stImage(`{"w":{"dtype":"F32","data_offsets":[0,4]}}`, one), []string{"missing shape"}},
		{"shape product mismatch", stImage(`{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}`, one), []string{"needs 8 bytes", "span 4"}},
		{"huge shape", stImage(`{"w":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}}`, one), []string{"needs more than", "span 4"}},
		{"negative dim", stImage(`{"w":{"dtype":"F32","shape":[-1,-4],"data_offsets":[0,4]}}`, one), []string{"negative dimension"}},
		{"fractional dim", stImage(`{"w":{"dtype":"F32","shape":[0.5],"data_offsets":[0,4]}}`, one), []string{"malformed entry"}},
		{"one offset", stImage(`{"w":{"dtype":"F32","shape":[1],"data_offsets":[4]}}`, one), []string{"data_offsets"}},
		{"reversed offsets", stImage(`{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}`, one), []string{"begin <= end"}},
		{"negative offset", stImage(`{"w":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}}`, one), []string{"begin <= end"}},
		{"huge offset", stImage(`{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551615]}}`, one), []string{"malformed entry"}},
		{"truncated data", stImage(`{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}`, one), []string{"beyond the 4-byte data buffer"}},
		{"overlap", stImage(`{`+okEntry+`,"v":{"dtype":"F16","shape":[2],"data_offsets":[2,6]}}`, stF32Bytes(1, 2)), []string{"overlap", `"v"`, `"w"`}},
		{"metadata not strings", stImage(`{"__metadata__":{"n":1},`+okEntry+`}`, one), []string{"__metadata__"}},
	}
	dir := t.TempDir()
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := stWriteFile(t, filepath.Join(dir, strings.ReplaceAll(c.name, " ", "_")+".safetensors"), c.image)
			f, err := OpenSafetensors(path)
			if err == nil {
				f.Close()
				t.Fatalf("case %d: no error", i)
			}
			if !errors.Is(err, ErrSafetensors) {
				t.Errorf("err = %v, want ErrSafetensors", err)
			}
			msg := err.Error()
			for _, w := range append([]string{path}, c.want...) {
				if !strings.Contains(msg, w) {
					t.Errorf("err = %q, want it to mention %q", msg, w)
				}
			}
		})
	}
	t.Run("directory", func(t *testing.T) {
		_, err := OpenSafetensors(dir)
		if !errors.Is(err, ErrSafetensors) || !strings.Contains(err.Error(), dir) {
			t.Errorf("err = %v", err)
		}
	})
	t.Run("missing file", func(t *testing.T) {
		p := filepath.Join(dir, "nope.safetensors")
		_, err := OpenSafetensors(p)
		if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), p) {
			t.Errorf("err = %v", err)
		}
	})
}

// The header may be followed by padding and the data may contain gaps and zero-size
// tensors; such files are valid.
func TestSafetensorsLenientLayouts(t *testing.T) {
	h := `{"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]},"e":{"dtype":"BF16","shape":[0],"data_offsets":[4,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}   `
	path := stWriteFile(t, filepath.Join(t.TempDir(), "x.safetensors"), stImage(h, stF32Bytes(1, 2, 3, 4)))
	f, err := OpenSafetensors(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for name, want := range map[string][]float32{"a": {1}, "b": {3}, "e": {}} {
		got, _, err := f.ReadTensor(name)
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("%s = %v, %v; want %v", name, got, err, want)
		}
	}
	if f.Metadata() != nil {
		t.Errorf("Metadata() = %v, want nil", f.Metadata())
	}
}

func TestSafetensorsTruncatedAfterOpen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.safetensors")
	if err := WriteSafetensors(path, []NamedTensor{{Name: "w", Shape: []int{4}, Data: []float32{1, 2, 3, 4}}}, nil); err != nil {
		t.Fatal(err)
	}
	f, err := OpenSafetensors(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := os.Stat(path)
	if err := os.Truncate(path, st.Size()-2); err != nil {
		t.Fatal(err)
	}
	if _, _, err := f.ReadTensor("w"); !errors.Is(err, ErrSafetensors) || !strings.Contains(err.Error(), path) {
		t.Errorf("err = %v, want ErrSafetensors naming the path", err)
	}
}

// f16Naive is the textbook value of a binary16 encoding, the twin of f16ToFloat32.
func f16Naive(h uint16) float64 {
	sign := 1.0
	if h&0x8000 != 0 {
		sign = -1
	}
	exp := int(h>>10) & 0x1f
	mant := float64(h & 0x3ff)
	switch exp {
	case 0:
		return sign * math.Ldexp(mant, -24)
	case 0x1f:
		if mant != 0 {
			return math.NaN()
		}
		return sign * math.Inf(1)
	}
	return sign * math.Ldexp(1+mant/1024, exp-15)
}

func TestSafetensorsF16Decode(t *testing.T) {
	known := []struct {
		bits uint16
		want float32
	}{
		{0x0000, 0},
		{0x3c00, 1},
		{0xc000, -2},
		{0x3555, 0.333251953125},
		{0x7bff, 65504},
		{0x0001, 5.960464477539063e-08}, // smallest subnormal 2⁻²⁴
		{0x03ff, 6.097555160522461e-05}, // largest subnormal
		{0x0400, 6.103515625e-05},       // smallest normal
		{0x8001, -5.960464477539063e-08},
		{0x7c00, float32(math.Inf(1))},
		{0xfc00, float32(math.Inf(-1))},
	}
	for _, k := range known {
		if got := tensor.Float16ToFloat32(k.bits); got != k.want {
			t.Errorf("f16 %#04x = %v, want %v", k.bits, got, k.want)
		}
	}
	if got := math.Float32bits(tensor.Float16ToFloat32(0x8000)); got != 0x80000000 {
		t.Errorf("f16 -0 = %#x, want float32 -0", got)
	}
	for _, nan := range []uint16{0x7e00, 0x7c01, 0xfe00} {
		if g := tensor.Float16ToFloat32(nan); !math.IsNaN(float64(g)) {
			t.Errorf("f16 %#04x = %v, want NaN", nan, g)
		}
	}
	// Every encoding against the naive twin, and narrowing back is the identity.
	for i := range 1 << 16 {
		h := uint16(i)
		got, want := tensor.Float16ToFloat32(h), f16Naive(h)
		if math.IsNaN(want) {
			if !math.IsNaN(float64(got)) || tensor.Float32ToFloat16(got)&0x7c00 != 0x7c00 || tensor.Float32ToFloat16(got)&0x3ff == 0 {
				t.Fatalf("f16 %#04x: NaN not preserved (%v)", h, got)
			}
			continue
		}
		if float64(got) != want || math.Signbit(float64(got)) != (h&0x8000 != 0) {
			t.Fatalf("f16 %#04x = %v, want %v", h, got, want)
		}
		if back := tensor.Float32ToFloat16(got); back != h {
			t.Fatalf("f16 %#04x -> %v -> %#04x", h, got, back)
		}
	}
}

func TestSafetensorsF16Encode(t *testing.T) {
	cases := []struct {
		in   float32
		want uint16
	}{
		{1 + 1.0/2048, 0x3c00},        // tie, rounds to even
		{1 + 3.0/2048, 0x3c02},        // tie, rounds to even (up)
		{1 + 1.0/2048 + 1e-7, 0x3c01}, // above the tie
		{65519, 0x7bff},
		{65520, 0x7c00}, // rounds to infinity
		{1e10, 0x7c00},
		{-1e10, 0xfc00},
		{math.Float32frombits(0x33000000), 0x0000}, // 2⁻²⁵: tie between 0 and the smallest subnormal
		{math.Float32frombits(0x33000001), 0x0001}, // just above
		{math.Float32frombits(0x33c00000), 0x0002}, // 1.5·2⁻²⁴: tie, to even
		{6.1e-05, 0x03ff},
		{6.1035e-05, 0x0400}, // rounds up into the smallest normal
		{1e-30, 0x0000},
		{-1e-30, 0x8000},
	}
	for _, c := range cases {
		if got := tensor.Float32ToFloat16(c.in); got != c.want {
			t.Errorf("tensor.Float32ToFloat16(%v) = %#04x, want %#04x", c.in, got, c.want)
		}
	}
	// Against the naive twin: the nearest binary16 value, ties to even.
	rng := rand.New(rand.NewPCG(3, 4))
	for range 200000 {
		f := math.Float32frombits(rng.Uint32())
		if math.IsNaN(float64(f)) || math.Abs(float64(f)) >= 65520 {
			continue
		}
		h := tensor.Float32ToFloat16(f)
		d := math.Abs(f16Naive(h) - float64(f))
		for _, n := range []uint16{h - 1, h + 1} {
			if n&0x7c00 == 0x7c00 || (n^h)&0x8000 != 0 {
				continue
			}
			dn := math.Abs(f16Naive(n) - float64(f))
			if dn < d || (dn == d && h&1 == 1) {
				t.Fatalf("tensor.Float32ToFloat16(%v) = %#04x (%v), but %#04x (%v) is nearer or even", f, h, f16Naive(h), n, f16Naive(n))
			}
		}
	}
}

func TestSafetensorsBF16(t *testing.T) {
	known := []struct {
		bits uint16
		want float32
	}{
		{0x3f80, 1},
		{0xc000, -2},
		{0x4049, 3.140625},
		{0x7f80, float32(math.Inf(1))},
		{0xff80, float32(math.Inf(-1))},
		{0x0001, math.Float32frombits(0x00010000)}, // subnormal
		{0x7f7f, math.Float32frombits(0x7f7f0000)}, // largest finite
	}
	for _, k := range known {
		if got := tensor.BFloat16ToFloat32(k.bits); got != k.want {
			t.Errorf("bf16 %#04x = %v, want %v", k.bits, got, k.want)
		}
		if back := tensor.Float32ToBFloat16(k.want); back != k.bits {
			t.Errorf("tensor.Float32ToBFloat16(%v) = %#04x, want %#04x", k.want, back, k.bits)
		}
	}
	if !math.IsNaN(float64(tensor.BFloat16ToFloat32(0x7fc0))) || !math.IsNaN(float64(tensor.BFloat16ToFloat32(tensor.Float32ToBFloat16(math.Float32frombits(0x7f800001))))) {
		t.Error("bf16 NaN not preserved")
	}
	rounding := []struct {
		in   uint32
		want uint16
	}{
		{0x3f808000, 0x3f80}, // tie, even stays
		{0x3f818000, 0x3f82}, // tie, odd rounds up
		{0x3f808001, 0x3f81},
		{0x7f7fffff, 0x7f80}, // overflows to infinity
	}
	for _, r := range rounding {
		if got := tensor.Float32ToBFloat16(math.Float32frombits(r.in)); got != r.want {
			t.Errorf("tensor.Float32ToBFloat16(%#08x) = %#04x, want %#04x", r.in, got, r.want)
		}
	}
}

// writeShard writes a safetensors file of float32 tensors with values name-index.
func stWriteShard(t *testing.T, path string, names ...string) map[string][]float32 {
	t.Helper()
	vals := map[string][]float32{}
	var ts []NamedTensor
	for i, n := range names {
		data := []float32{float32(i), float32(i) + 0.5}
		vals[n] = data
		ts = append(ts, NamedTensor{Name: n, Shape: []int{1, 2}, Data: data})
	}
	if err := WriteSafetensors(path, ts, nil); err != nil {
		t.Fatal(err)
	}
	return vals
}

func TestSafetensorsDirSharded(t *testing.T) {
	dir := t.TempDir()
	v1 := stWriteShard(t, filepath.Join(dir, "model-00001-of-00002.safetensors"), "a", "b")
	// The second shard is garbage: it must never be opened unless asked for.
	stWriteFile(t, filepath.Join(dir, "model-00002-of-00002.safetensors"), []byte("not a safetensors file"))
	index := `{"metadata":{"total_size":16},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00001-of-00002.safetensors","c":"model-00002-of-00002.safetensors","ghost":"model-00001-of-00002.safetensors"}}`
	stWriteFile(t, filepath.Join(dir, "model.safetensors.index.json"), []byte(index))

	src, err := OpenSafetensorsDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	rec := NewRecordingSource(src)
	for _, n := range []string{"a", "b"} {
		data, shape, err := rec.ReadTensor(n)
		if err != nil || !slices.Equal(data, v1[n]) || !slices.Equal(shape, []int{1, 2}) {
			t.Errorf("%s = %v %v %v, want %v", n, data, shape, err, v1[n])
		}
	}
	d := src.(*safetensorsDir)
	if len(d.shards) != 1 {
		t.Errorf("%d shards opened, want 1", len(d.shards))
	}
	if got := d.Names(); !slices.Equal(got, []string{"a", "b", "c", "ghost"}) {
		t.Errorf("Names() = %v", got)
	}
	if _, ok := rec.Shape("c"); ok {
		t.Error("Shape of a tensor in a corrupt shard reported ok")
	}
	if _, _, err := rec.ReadTensor("c"); !errors.Is(err, ErrSafetensors) || !strings.Contains(err.Error(), "model-00002-of-00002.safetensors") {
		t.Errorf("read from corrupt shard: %v", err)
	}
	if _, _, err := rec.ReadTensor("ghost"); !errors.Is(err, ErrSafetensors) {
		t.Errorf("tensor missing from its shard: %v, want ErrSafetensors", err)
	}
	if _, _, err := rec.ReadTensor("zzz"); !errors.Is(err, ErrTensorNotFound) {
		t.Errorf("unknown tensor: %v, want ErrTensorNotFound", err)
	}
	if got, want := rec.Read(), []string{"a", "b", "c", "ghost", "zzz"}; !slices.Equal(got, want) {
		t.Errorf("Read() = %v, want %v", got, want)
	}
	if err := rec.Close(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := src.ReadTensor("a"); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("read after Close: %v, want fs.ErrClosed", err)
	}
}

func TestSafetensorsDirSingleAndErrors(t *testing.T) {
	dir := t.TempDir()
	vals := stWriteShard(t, filepath.Join(dir, "model.safetensors"), "x")
	src, err := OpenSafetensorsDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if data, _, err := src.ReadTensor("x"); err != nil || !slices.Equal(data, vals["x"]) {
		t.Errorf("x = %v, %v", data, err)
	}
	src.Close()

	cases := []struct {
		name, index string
	}{
		{"malformed", `{"weight_map":`},
		{"empty", `{"weight_map":{}}`},
		{"escaping shard", `{"weight_map":{"x":"../model.safetensors"}}`},
		{"absolute shard", `{"weight_map":{"x":"/etc/passwd"}}`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := t.TempDir()
			p := stWriteFile(t, filepath.Join(d, "model.safetensors.index.json"), []byte(c.index))
			_, err := OpenSafetensorsDir(d)
			if !errors.Is(err, ErrSafetensors) || !strings.Contains(err.Error(), p) {
				t.Errorf("err = %v, want ErrSafetensors naming %s", err, p)
			}
		})
	}
	_, err = OpenSafetensorsDir(t.TempDir())
	if !errors.Is(err, ErrSafetensors) || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("empty dir: %v, want ErrSafetensors and fs.ErrNotExist", err)
	}
}

func TestMapSource(t *testing.T) {
	data := []float32{1, 2, 3, 4, 5, 6}
	m := NewMapSource(NamedTensor{Name: "w", Shape: []int{2, 3}, Data: data}, NamedTensor{Name: "s", Shape: nil, Data: []float32{7}})
	var _ TensorSource = m
	got, shape, err := m.ReadTensor("w")
	if err != nil || !slices.Equal(got, data) || !slices.Equal(shape, []int{2, 3}) {
		t.Fatalf("w = %v %v %v", got, shape, err)
	}
	got[0] = 100
	shape[0] = 100
	if again, s, _ := m.ReadTensor("w"); again[0] != 1 || s[0] != 2 {
		t.Error("MapSource handed out its own storage")
	}
	if !slices.Equal(m.Names(), []string{"s", "w"}) {
		t.Errorf("Names() = %v", m.Names())
	}
	if _, _, err := m.ReadTensor("nope"); !errors.Is(err, ErrTensorNotFound) {
		t.Errorf("unknown: %v", err)
	}
	m.Close()
	if _, _, err := m.ReadTensor("w"); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("after Close: %v", err)
	}
	for name, ts := range map[string][]NamedTensor{
		"shape":     {{Name: "w", Shape: []int{4}, Data: data}},
		"duplicate": {{Name: "w", Shape: []int{6}, Data: data}, {Name: "w", Shape: []int{6}, Data: data}},
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s: NewMapSource did not panic", name)
				}
			}()
			NewMapSource(ts...)
		}()
	}
}

// The real Hugging Face model in ../shared opens, and its tensors match its config.json.
func TestSafetensorsRealModel(t *testing.T) {
	dir := filepath.Join("..", "..", "shared", "models", "tinystories-8L")
	if _, err := os.Stat(filepath.Join(dir, "model.safetensors")); err != nil {
		t.Fatalf("shared model missing: %v", err)
	}
	cfg, err := ReadConfig(filepath.Join(dir, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	f, err := OpenSafetensors(filepath.Join(dir, "model.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	want := map[string][]int{
		"model.embed_tokens.weight":                      {cfg.Vocab, cfg.Dim},
		"lm_head.weight":                                 {cfg.Vocab, cfg.Dim},
		"model.norm.weight":                              {cfg.Dim},
		"model.layers.0.self_attn.k_proj.weight":         {cfg.KVHeads * cfg.HeadDim, cfg.Dim},
		"model.layers.7.mlp.down_proj.weight":            {cfg.Dim, cfg.FFN},
		"model.layers.3.post_attention_layernorm.weight": {cfg.Dim},
	}
	for name, shape := range want {
		if got, ok := f.Shape(name); !ok || !slices.Equal(got, shape) {
			t.Errorf("%s: shape %v, want %v", name, got, shape)
		}
	}
	if n := len(f.Names()); n != 2+1+9*cfg.Layers {
		t.Errorf("%d tensors, want %d", n, 2+1+9*cfg.Layers)
	}
	for _, name := range f.Names() {
		data, _, err := f.ReadTensor(name)
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range data {
			if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
				t.Fatalf("%s holds %v", name, v)
			}
		}
	}
}

func FuzzSafetensorsHeader(f *testing.F) {
	dir := f.TempDir()
	path := filepath.Join(dir, "seed.safetensors")
	seeds := [][]NamedTensor{
		{{Name: "w", Shape: []int{2, 3}, Data: []float32{1, 2, 3, 4, 5, 6}}},
		{{Name: "a", Shape: []int{2}, Data: []float32{1, 2}, DType: "F16"}, {Name: "b", Shape: []int{}, Data: []float32{3}, DType: "BF16"}, {Name: "c", Shape: []int{0}}},
	}
	for _, ts := range seeds {
		if err := WriteSafetensors(path, ts, map[string]string{"format": "pt"}); err != nil {
			f.Fatal(err)
		}
		b, err := os.ReadFile(path)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add(stImage(`{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"v":{"dtype":"F16","shape":[2],"data_offsets":[2,6]}}`, stF32Bytes(1, 2)))
	f.Add(stImage(`{"w":{"dtype":"I8","shape":[-1],"data_offsets":[4,0]}}`, nil))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, '{', '}'})
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := newSafetensors("fuzz.safetensors", bytes.NewReader(b), int64(len(b)))
		if err != nil {
			if !errors.Is(err, ErrSafetensors) {
				t.Fatalf("error does not wrap ErrSafetensors: %v", err)
			}
			return
		}
		for _, name := range s.Names() {
			data, shape, err := s.ReadTensor(name)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			n := 1
			for _, d := range shape {
				n *= d
			}
			if n != len(data) {
				t.Fatalf("%s: %d values for shape %v", name, len(data), shape)
			}
		}
	})
}
