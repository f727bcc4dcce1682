package model

import (
	"math"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"testing"

	"linearpatch/model/tensor"
)

// halfModels are the shared checkpoints stored in half precision.
var halfModels = []struct {
	name, path string
	dt         tensor.DType
}{
	{"llama3-rope BF16", "models/arch/llama3-rope", tensor.BF16},
	{"mistral-swa F16", "models/arch/mistral-swa", tensor.F16},
	{"qwen2-bias BF16 sharded", "models/arch/qwen2-bias", tensor.BF16},
	{"qwen3-qknorm BF16", "models/arch/qwen3-qknorm", tensor.BF16},
}

// matrices lists every weight matrix of m that is loaded.
func matrices(m *Model) []*tensor.Matrix {
	ws := []*tensor.Matrix{m.Embed, m.Head}
	for _, ly := range m.Layers {
		if ly != nil {
			ws = append(ws, ly.Wq, ly.Wk, ly.Wv, ly.Wo, ly.Wgate, ly.Wup, ly.Wdown)
		}
	}
	return slices.DeleteFunc(ws, func(w *tensor.Matrix) bool { return w == nil })
}

func randomIDs(rng *rand.Rand, batch, T, vocab int) [][]int {
	ids := make([][]int, batch)
	for b := range ids {
		ids[b] = make([]int, T)
		for t := range ids[b] {
			ids[b][t] = rng.IntN(vocab)
		}
	}
	return ids
}

// TestHalfResidentForward: BF16 and F16 checkpoints load with their weight matrices in
// their stored dtype (mapped from the file), and their forward equals the forward of the
// same weights widened to float32 up to float32 rounding.
func TestHalfResidentForward(t *testing.T) {
	for _, hm := range halfModels {
		t.Run(hm.name, func(t *testing.T) {
			m, err := Load(sharedPath(t, hm.path))
			if err != nil {
				t.Fatal(err)
			}
			for _, w := range matrices(m) {
				if w.DType != hm.dt || w.Data != nil || len(w.Half) != w.Rows*w.Cols {
					t.Fatalf("a %d×%d weight is %v with %d float32 and %d half values, want %v only",
						w.Rows, w.Cols, w.DType, len(w.Data), len(w.Half), hm.dt)
				}
			}
			if m.VectorDType != hm.dt {
				t.Fatalf("VectorDType %v, want %v", m.VectorDType, hm.dt)
			}
			ids := randomIDs(rand.New(rand.NewPCG(1, 2)), 2, 37, m.Vocab)
			got, want := m.Forward(ids), m.WithDType(tensor.F32).Forward(ids)
			var worst float64
			for i := range got.Data {
				d := math.Abs(float64(got.Data[i]-want.Data[i])) / math.Max(1, math.Abs(float64(want.Data[i])))
				worst = math.Max(worst, d)
			}
			if worst > 1e-4 {
				t.Fatalf("half-resident logits differ from the widened model's by %.3g (relative)", worst)
			}
			t.Logf("largest relative logit difference %.3g", worst)
		})
	}
}

// TestSafetensorsReadHalfMapped: a half tensor of a safetensors file is handed out as a
// slice of the file's mapping (owner set), and the copy path used without a mapping gives
// the same bits; F32 tensors are declined.
func TestSafetensorsReadHalfMapped(t *testing.T) {
	path := filepath.Join(t.TempDir(), "m.safetensors")
	vals := []float32{1, -2.5, 0.1, 3e-3, 65504, -0, 7, 1e-7}
	err := WriteSafetensors(path, []NamedTensor{
		{Name: "b", Shape: []int{2, 4}, Data: vals, DType: "BF16"},
		{Name: "f", Shape: []int{2, 4}, Data: vals, DType: "F16"},
		{Name: "s", Shape: []int{1}, Data: vals[:1]},
		{Name: "e", Shape: []int{0, 4}, Data: []float32{}, DType: "BF16"},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	s, err := OpenSafetensors(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.mapping == nil {
		t.Fatal("the file was not mapped")
	}
	for _, c := range []struct {
		name string
		dt   tensor.DType
	}{{"b", tensor.BF16}, {"f", tensor.F16}} {
		dt, mapped, owner, ok, err := s.readHalf(c.name)
		if err != nil || !ok || dt != c.dt || owner == nil || len(mapped) != 8 {
			t.Fatalf("%s: readHalf = %v, %d values, owner %v, %v, %v", c.name, dt, len(mapped), owner, ok, err)
		}
		want, _, err := s.ReadTensor(c.name)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]float32, 8)
		tensor.WidenHalf(got, mapped, dt)
		if !slices.Equal(got, want) {
			t.Fatalf("%s: mapped bits widen to %v, ReadTensor gives %v", c.name, got, want)
		}
		keep := s.mapping
		s.mapping = nil // the copy path
		_, copied, owner, ok, err := s.readHalf(c.name)
		s.mapping = keep
		if err != nil || !ok || owner != nil || !slices.Equal(copied, mapped) {
			t.Fatalf("%s: read without a mapping = %v (owner %v, %v, %v), mapped %v", c.name, copied, owner, ok, err, mapped)
		}
	}
	if _, _, _, ok, err := s.readHalf("s"); ok || err != nil {
		t.Fatalf("F32 tensor: readHalf ok=%v err=%v, want declined", ok, err)
	}
	if _, data, _, ok, err := s.readHalf("e"); !ok || err != nil || len(data) != 0 {
		t.Fatalf("empty tensor: %v, %v, %v", data, ok, err)
	}
	if _, _, _, _, err := s.readHalf("nope"); err == nil {
		t.Fatal("unknown tensor: no error")
	}

	// A float32 checkpoint is read as before, never mapped.
	f32 := filepath.Join(t.TempDir(), "f.safetensors")
	if err := WriteSafetensors(f32, []NamedTensor{{Name: "w", Shape: []int{2, 4}, Data: vals}}, nil); err != nil {
		t.Fatal(err)
	}
	sf, err := OpenSafetensors(f32)
	if err != nil {
		t.Fatal(err)
	}
	defer sf.Close()
	if sf.mapping != nil {
		t.Fatal("a float32-only file was mapped")
	}
}

// TestSaveKeepsDType: a pruned, patched half-precision model is exported with every kept
// tensor in its source dtype (bit for bit) and the patch in F32, and reloads with the same
// forward; a float32 model stays float32.
func TestSaveKeepsDType(t *testing.T) {
	for _, c := range []struct {
		name, path string
		dt         tensor.DType
	}{
		{"llama3-rope BF16", "models/arch/llama3-rope", tensor.BF16},
		{"mistral-swa F16", "models/arch/mistral-swa", tensor.F16},
		{"qwen3-qknorm BF16", "models/arch/qwen3-qknorm", tensor.BF16},
		{"tinystories-8L F32", "models/tinystories-8L", tensor.F32},
	} {
		t.Run(c.name, func(t *testing.T) {
			src := sharedPath(t, c.path)
			m, err := Load(src)
			if err != nil {
				t.Fatal(err)
			}
			rng := rand.New(rand.NewPCG(3, 4))
			p := tensor.New(m.Dim, m.Dim)
			for i := range p.Data {
				p.Data[i] = float32(rng.NormFloat64() / math.Sqrt(float64(m.Dim)))
			}
			pruned := m.Pruned(2, 4, p)
			dir := filepath.Join(t.TempDir(), "out")
			if err := pruned.Save(dir); err != nil {
				t.Fatal(err)
			}
			out, err := OpenSafetensors(filepath.Join(dir, "model.safetensors"))
			if err != nil {
				t.Fatal(err)
			}
			defer out.Close()
			in, err := OpenSafetensorsDir(src)
			if err != nil {
				t.Fatal(err)
			}
			defer in.Close()
			for _, name := range out.Names() {
				dt, _ := out.DType(name)
				want := c.dt.String()
				if name == PatchTensorName {
					want = "F32"
				}
				if dt != want {
					t.Errorf("%s written as %s, want %s", name, dt, want)
				}
			}
			// Layer 4 of the source is layer 2 of the export: the same bytes.
			if c.dt != tensor.F32 {
				_, a, _, _, err := out.readHalf("model.layers.2.mlp.down_proj.weight")
				if err != nil {
					t.Fatal(err)
				}
				_, b, _, _, err := in.(halfReader).readHalf("model.layers.4.mlp.down_proj.weight")
				if err != nil {
					t.Fatal(err)
				}
				if !slices.Equal(a, b) {
					t.Fatal("an exported half weight differs from the source's bits")
				}
			}
			back, err := Load(dir)
			if err != nil {
				t.Fatal(err)
			}
			ids := randomIDs(rng, 1, 21, m.Vocab)
			if got, want := back.Forward(ids), pruned.Forward(ids); !slices.Equal(got.Data, want.Data) {
				t.Fatal("the reloaded export's logits differ from the in-memory pruned model's")
			}
		})
	}
}

func TestWithDType(t *testing.T) {
	m, err := Synthetic(Config{Dim: 16, Layers: 2, Heads: 4, KVHeads: 2, FFN: 32, Vocab: 50, TiedHead: true}, 1)
	if err != nil {
		t.Fatal(err)
	}
	h := m.WithDType(tensor.BF16)
	if h.Head != h.Embed {
		t.Fatal("a tied head no longer aliases the embeddings")
	}
	for i, w := range matrices(h) {
		want := matrices(m)[i]
		if w.DType != tensor.BF16 || w.Rows != want.Rows || w.Cols != want.Cols {
			t.Fatalf("matrix %d: %v %d×%d", i, w.DType, w.Rows, w.Cols)
		}
		for j, v := range w.F32().Data {
			if v != tensor.BFloat16ToFloat32(tensor.Float32ToBFloat16(want.Data[j])) {
				t.Fatalf("matrix %d [%d]: %v is not %v rounded to BF16", i, j, v, want.Data[j])
			}
		}
	}
	if h.WithDType(tensor.BF16).Embed != h.Embed {
		t.Fatal("a matrix already in the dtype was copied")
	}
	if f := h.WithDType(tensor.F32); f.Embed.IsHalf() || f.VectorDType != tensor.F32 || m.Embed.IsHalf() {
		t.Fatal("widening back to F32 failed or changed the source")
	}
}

// TestHalfSuffixOnly: the student's partial load (a suffix of layers, no embeddings) keeps
// the half-precision weights too and reads only what it needs.
func TestHalfSuffixOnly(t *testing.T) {
	var read []string
	m, err := Load(sharedPath(t, "models/arch/qwen2-bias"), WithLayers(6, 8), WithoutEmbeddings(), WithReadLog(&read))
	if err != nil {
		t.Fatal(err)
	}
	if m.Embed != nil || m.Layers[5] != nil || m.Layers[6] == nil || m.Layers[7].Wup.DType != tensor.BF16 || m.Head.DType != tensor.BF16 {
		t.Fatal("the suffix-only load did not keep BF16 weights of layers 6..7 and the head alone")
	}
	for _, name := range read {
		if name == "model.embed_tokens.weight" && !m.TiedHead {
			t.Fatalf("read %s", name)
		}
	}
	if want := 2*12 + 2; len(read) != want { // 12 tensors a qwen2 layer, the final norm and the head
		t.Fatalf("read %d tensors, want %d: %v", len(read), want, read)
	}
}
