package model

import (
	"path/filepath"
	"slices"
	"testing"

	"linearpatch/model/tensor"
)

// archVariants are the architecture variants of tinystories-8L in ../shared/models/arch,
// with the feature each exercises; golden/arch.json holds their reference perplexities.
var archVariants = []struct {
	name  string
	check func(Config) bool
}{
	{"llama3-rope", func(c Config) bool { return c.Arch == "llama" && c.Scaling != nil }},
	{"mistral-swa", func(c Config) bool { return c.Arch == "mistral" && c.SlidingWindow == 48 }},
	{"qwen2-bias", func(c Config) bool { return c.Arch == "qwen2" && c.QKVBias }},
	{"qwen3-qknorm", func(c Config) bool { return c.Arch == "qwen3" && c.QKNorm && c.HeadDim == 48 }},
}

// TestArchVariantsLoad loads each variant with its feature and checks what the golden
// perplexities cannot localize: Mistral's window leaves positions < 48 as plain causal
// attention computes them and changes the later ones; Qwen3's q/k norm weights are read
// and change the logits. The golden perplexities themselves (golden/arch.json, all 510
// windows) are checked through the CLI by cmd/linearpatch's TestEvalArchGolden.
func TestArchVariantsLoad(t *testing.T) {
	ids := [][]int{make([]int, 96)}
	for i := range ids[0] {
		ids[0][i] = (i*37 + 11) % 1000
	}
	for _, v := range archVariants {
		t.Run(v.name, func(t *testing.T) {
			m, err := Load(sharedPath(t, filepath.Join("models", "arch", v.name)))
			if err != nil {
				t.Fatal(err)
			}
			if !v.check(m.Config) {
				t.Fatalf("config lacks the variant's feature: %+v", m.Config)
			}
			got := m.Forward(ids)
			plain := *m
			switch {
			case m.SlidingWindow > 0:
				plain.SlidingWindow = 0
			case m.QKNorm:
				plain.Layers = nil
				for _, ly := range m.Layers {
					l := *ly
					l.QNorm, l.KNorm = nil, nil
					plain.Layers = append(plain.Layers, &l)
				}
			default:
				return
			}
			want := plain.Forward(ids)
			for t0 := range 96 {
				same := slices.Equal(got.Row(t0), want.Row(t0))
				if m.SlidingWindow > 0 && same != (t0 < m.SlidingWindow) {
					t.Fatalf("position %d: logits equal to plain causal attention's: %v", t0, same)
				}
				if m.QKNorm && same && t0 > 0 { // position 0 attends to itself only
					t.Fatalf("position %d: q/k norm changes nothing", t0)
				}
			}
		})
	}
}

// TestSaveLoadArchitectures: a synthetic model of each architecture saved and loaded back
// keeps its features and gives the same logits; the features change the logits.
func TestSaveLoadArchitectures(t *testing.T) {
	base := Config{Dim: 32, FFN: 48, Layers: 2, Heads: 4, KVHeads: 2, Vocab: 40, MaxSeq: 64}
	ids := [][]int{make([]int, 20)}
	for i := range ids[0] {
		ids[0][i] = (i*7 + 3) % 40
	}
	plain, err := Synthetic(base, 5)
	if err != nil {
		t.Fatal(err)
	}
	plainLogits := plain.Forward(ids).Data
	for _, c := range []struct {
		name string
		edit func(*Config)
	}{
		{"qwen3", func(c *Config) { c.QKNorm, c.HeadDim = true, 12 }},
		{"mistral", func(c *Config) { c.SlidingWindow = 5 }},
		{"qwen2", func(c *Config) { c.QKVBias = true }},
		{"llama3", func(c *Config) {
			c.Scaling = &RopeScaling{Type: "llama3", Factor: 4, LowFreqFactor: 1, HighFreqFactor: 4, OriginalMaxPositionEmbeddings: 16}
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := base
			c.edit(&cfg)
			m, err := Synthetic(cfg, 5)
			if err != nil {
				t.Fatal(err)
			}
			if m.Arch != c.name && !(c.name == "llama3" && m.Arch == "llama") {
				t.Fatalf("Synthetic inferred model_type %q", m.Arch)
			}
			dir := t.TempDir()
			if err := m.Save(dir); err != nil {
				t.Fatal(err)
			}
			back, err := Load(dir)
			if err != nil {
				t.Fatal(err)
			}
			if back.Arch != m.Arch || back.QKNorm != m.QKNorm || back.SlidingWindow != m.SlidingWindow ||
				back.QKVBias != m.QKVBias || back.HeadDim != m.HeadDim || (back.Scaling == nil) != (m.Scaling == nil) {
				t.Fatalf("config after save/load %+v, want %+v", back.Config, m.Config)
			}
			want := m.Forward(ids).Data
			if got := back.Forward(ids).Data; !slices.Equal(got, want) {
				t.Fatal("logits differ after save/load")
			}
			if c.name != "qwen3" && slices.Equal(want, plainLogits) {
				t.Fatal("the feature does not change the logits")
			}
		})
	}
}

// TestSaveMistralWithoutWindow: a Mistral model without a sliding window keeps none
// through Save and Load (config.json's sliding_window is null, not absent, which would mean
// transformers' default of 4096).
func TestSaveMistralWithoutWindow(t *testing.T) {
	m, err := Synthetic(Config{Arch: "mistral", Dim: 16, FFN: 16, Layers: 1, Heads: 2, Vocab: 10}, 1)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := m.Save(dir); err != nil {
		t.Fatal(err)
	}
	back, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if back.Arch != "mistral" || back.SlidingWindow != 0 {
		t.Fatalf("reloaded %s with window %d", back.Arch, back.SlidingWindow)
	}
}

// TestWriteSynthetic: the streamed writer gives, once loaded, exactly Synthetic's weights
// (F32) or their rounding (F16, BF16), for every architecture.
func TestWriteSynthetic(t *testing.T) {
	base := Config{Dim: 24, FFN: 40, Layers: 2, Heads: 4, KVHeads: 2, Vocab: 30, MaxSeq: 32}
	round := map[string]func(float32) float32{
		"F32":  func(v float32) float32 { return v },
		"F16":  func(v float32) float32 { return tensor.Float16ToFloat32(tensor.Float32ToFloat16(v)) },
		"BF16": func(v float32) float32 { return tensor.BFloat16ToFloat32(tensor.Float32ToBFloat16(v)) },
	}
	for _, c := range []struct {
		name, dtype string
		edit        func(*Config)
	}{
		{"llama", "F32", func(c *Config) {}},
		{"qwen3", "BF16", func(c *Config) { c.QKNorm, c.HeadDim, c.TiedHead = true, 10, true }},
		{"mistral", "F16", func(c *Config) { c.SlidingWindow = 3 }},
		{"qwen2", "F32", func(c *Config) { c.QKVBias = true }},
		{"llama3", "BF16", func(c *Config) {
			c.Scaling = &RopeScaling{Type: "llama3", Factor: 8, LowFreqFactor: 1, HighFreqFactor: 4, OriginalMaxPositionEmbeddings: 16}
		}},
	} {
		t.Run(c.name+"/"+c.dtype, func(t *testing.T) {
			cfg := base
			c.edit(&cfg)
			want, err := Synthetic(cfg, 9)
			if err != nil {
				t.Fatal(err)
			}
			dir := t.TempDir()
			wrote, err := WriteSynthetic(dir, cfg, 9, c.dtype)
			if err != nil {
				t.Fatal(err)
			}
			got, err := Load(dir)
			if err != nil {
				t.Fatal(err)
			}
			if got.Arch != want.Arch || wrote.Arch != want.Arch || got.QKNorm != want.QKNorm || got.SlidingWindow != want.SlidingWindow ||
				got.TiedHead != want.TiedHead || (got.Scaling == nil) != (want.Scaling == nil) {
				t.Fatalf("config %+v, want %+v", got.Config, want.Config)
			}
			f, err := OpenSafetensors(filepath.Join(dir, "model.safetensors"))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			// Every tensor holds the spec's values (the ones Synthetic builds its model from),
			// rounded to the dtype.
			r := round[c.dtype]
			rng := synthRand(9)
			specs := synthSpecs(wrote)
			if len(f.Names()) != len(specs) {
				t.Fatalf("%d tensors, want %d", len(f.Names()), len(specs))
			}
			for _, sp := range specs {
				data, shape, err := f.ReadTensor(sp.name)
				if err != nil {
					t.Fatal(err)
				}
				if !slices.Equal(shape, sp.shape) {
					t.Fatalf("%s: shape %v, want %v", sp.name, shape, sp.shape)
				}
				want := make([]float32, sp.size())
				sp.fill(rng, want)
				for i, v := range want {
					if r(v) != data[i] {
						t.Fatalf("%s[%d] = %v, want %v", sp.name, i, data[i], r(v))
					}
				}
			}
			if c.dtype == "F32" { // the same model as Synthetic's
				ids := [][]int{{1, 5, 9, 2, 29, 3, 3, 7}}
				if !slices.Equal(got.Forward(ids).Data, want.Forward(ids).Data) {
					t.Fatal("logits differ from Synthetic's model")
				}
			}
			if dt, _ := f.DType("model.norm.weight"); dt != c.dtype {
				t.Fatalf("dtype %s, want %s", dt, c.dtype)
			}
		})
	}
	if _, err := WriteSynthetic(t.TempDir(), base, 1, "F8"); err == nil {
		t.Fatal("dtype F8 accepted")
	}
}
