package model

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"

	"linearpatch/internal/atomicfile"
	"linearpatch/model/tensor"
)

// synthSpec is one tensor of a synthetic model: its name, shape and distribution. The
// tensors are drawn in the order synthSpecs lists them, element by element from one seeded
// stream, so a model can be generated whole (Synthetic) or streamed to disk a block at a
// time (WriteSynthetic) with the same values.
type synthSpec struct {
	name  string
	shape []int
	std   float64 // N(0, std²); 0 for a norm weight, 1 ± 0.1 uniform
}

func (s synthSpec) size() int {
	n := 1
	for _, d := range s.shape {
		n *= d
	}
	return n
}

// fill draws the next len(dst) values of s from rng into dst.
func (s synthSpec) fill(rng *rand.Rand, dst []float32) {
	if s.std == 0 {
		for i := range dst {
			dst[i] = float32(1 + 0.1*(2*rng.Float64()-1))
		}
		return
	}
	for i := range dst {
		dst[i] = float32(rng.NormFloat64() * s.std)
	}
}

// synthDefaults fills the defaults of a synthetic model's configuration and validates it.
// An empty Arch is inferred from the features asked for: qwen2 with QKVBias, qwen3 with
// QKNorm, mistral with a SlidingWindow, llama otherwise.
func synthDefaults(cfg Config) (Config, error) {
	if cfg.Arch == "" {
		switch {
		case cfg.QKVBias:
			cfg.Arch = "qwen2"
		case cfg.QKNorm:
			cfg.Arch = "qwen3"
		case cfg.SlidingWindow > 0:
			cfg.Arch = "mistral"
		default:
			cfg.Arch = "llama"
		}
	}
	if cfg.NormEps == 0 {
		cfg.NormEps = 1e-5
	}
	if cfg.RopeTheta == 0 {
		cfg.RopeTheta = 10000
	}
	if cfg.HeadDim == 0 && cfg.Heads > 0 {
		cfg.HeadDim = cfg.Dim / cfg.Heads
	}
	if cfg.KVHeads == 0 {
		cfg.KVHeads = cfg.Heads
	}
	if cfg.BOS == 0 && cfg.EOS == 0 {
		cfg.BOS, cfg.EOS = 1, 2
	}
	cfg.LinearPatch = nil
	return cfg, cfg.Validate()
}

// synthSpecs lists the tensors of a synthetic model of cfg in drawing order: projections
// N(0, 1/fan_in) (so activations keep a sane scale through depth), norms 1 ± 0.1, biases
// N(0, 0.02²), embeddings N(0, 1) — N(0, 1/d) when the head is tied to them, or every
// token's own logit would be about d and the perplexity overflow.
func synthSpecs(cfg Config) []synthSpec {
	d, hd := cfg.Dim, cfg.HeadDim
	in := func(fan int) float64 { return 1 / math.Sqrt(float64(fan)) }
	embedStd := 1.0
	if cfg.TiedHead {
		embedStd = in(d)
	}
	specs := []synthSpec{{"model.embed_tokens.weight", []int{cfg.Vocab, d}, embedStd}}
	for l := range cfg.Layers {
		p := fmt.Sprintf("model.layers.%d.", l)
		add := func(name string, std float64, shape ...int) {
			specs = append(specs, synthSpec{p + name, shape, std})
		}
		add("input_layernorm.weight", 0, d)
		add("self_attn.q_proj.weight", in(d), cfg.Heads*hd, d)
		add("self_attn.k_proj.weight", in(d), cfg.KVHeads*hd, d)
		add("self_attn.v_proj.weight", in(d), cfg.KVHeads*hd, d)
		if cfg.QKVBias {
			add("self_attn.q_proj.bias", 0.02, cfg.Heads*hd)
			add("self_attn.k_proj.bias", 0.02, cfg.KVHeads*hd)
			add("self_attn.v_proj.bias", 0.02, cfg.KVHeads*hd)
		}
		if cfg.QKNorm {
			add("self_attn.q_norm.weight", 0, hd)
			add("self_attn.k_norm.weight", 0, hd)
		}
		add("self_attn.o_proj.weight", in(cfg.Heads*hd), d, cfg.Heads*hd)
		add("post_attention_layernorm.weight", 0, d)
		add("mlp.gate_proj.weight", in(d), cfg.FFN, d)
		add("mlp.up_proj.weight", in(d), cfg.FFN, d)
		add("mlp.down_proj.weight", in(cfg.FFN), d, cfg.FFN)
	}
	specs = append(specs, synthSpec{"model.norm.weight", []int{d}, 0})
	if !cfg.TiedHead {
		specs = append(specs, synthSpec{"lm_head.weight", []int{cfg.Vocab, d}, in(d)})
	}
	return specs
}

func synthRand(seed uint64) *rand.Rand { return rand.New(rand.NewPCG(seed, 0x6c696e6561727061)) }

// Synthetic returns a model with the given configuration and seeded random weights (see
// synthSpecs for the distributions and synthDefaults for the defaults filled, Arch among
// them). The same config and seed give the same weights.
func Synthetic(cfg Config, seed uint64) (*Model, error) {
	cfg, err := synthDefaults(cfg)
	if err != nil {
		return nil, err
	}
	rng := synthRand(seed)
	var ts []NamedTensor
	for _, s := range synthSpecs(cfg) {
		data := make([]float32, s.size())
		s.fill(rng, data)
		ts = append(ts, NamedTensor{Name: s.name, Shape: s.shape, Data: data})
	}
	return FromSource(cfg, NewMapSource(ts...))
}

// WriteSynthetic writes the model Synthetic(cfg, seed) would return into dir (created if
// missing) as config.json and model.safetensors with every tensor in dtype ("F32", "F16"
// or "BF16", rounded to nearest even). The weights are drawn and written a block at a
// time, so a model far larger than memory can be written. It returns the configuration
// written (defaults filled). Files are written under temporary names and renamed; callers
// that need the whole directory to appear at once write to a temporary directory.
func WriteSynthetic(dir string, cfg Config, seed uint64, dtype string) (Config, error) {
	cfg, err := synthDefaults(cfg)
	if err != nil {
		return Config{}, err
	}
	esize, ok := stDTypeSize(dtype)
	if !ok {
		return Config{}, fmt.Errorf("%w: dtype %q (want F32, F16 or BF16)", ErrConfig, dtype)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return Config{}, fmt.Errorf("model: synth: %w", err)
	}
	specs := synthSpecs(cfg)
	path := filepath.Join(dir, "model.safetensors")
	if err := atomicfile.WriteFunc(path, 0o644, func(w io.Writer) error {
		return writeSynthBody(w, specs, synthRand(seed), dtype, esize)
	}); err != nil {
		return Config{}, fmt.Errorf("model: synth: %w", err)
	}
	hf := cfg.hf(nil)
	hf["torch_dtype"] = map[string]string{"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype]
	b, err := json.MarshalIndent(hf, "", "  ")
	if err != nil {
		return Config{}, fmt.Errorf("model: synth: %w", err)
	}
	cfgPath := filepath.Join(dir, "config.json")
	if err := atomicfile.Write(cfgPath, append(b, '\n'), 0o644); err != nil {
		return Config{}, err
	}
	if err := os.Chmod(cfgPath, 0o644); err != nil {
		return Config{}, fmt.Errorf("model: synth: %w", err)
	}
	return cfg, nil
}

// writeSynthBody writes a safetensors file of specs to w, drawing the values from rng in
// blocks of at most synthBlock elements.
func writeSynthBody(w io.Writer, specs []synthSpec, rng *rand.Rand, dtype string, esize int) error {
	var h bytes.Buffer
	h.WriteString(`{"__metadata__":{"format":"pt"}`)
	var off int64
	for _, s := range specs {
		sb, _ := json.Marshal(s.shape)
		end := off + int64(s.size())*int64(esize)
		fmt.Fprintf(&h, `,%q:{"dtype":"%s","shape":%s,"data_offsets":[%d,%d]}`, s.name, dtype, sb, off, end)
		off = end
	}
	h.WriteByte('}')
	for h.Len()%8 != 0 {
		h.WriteByte(' ')
	}
	bw := bufio.NewWriterSize(w, 1<<20)
	var prefix [8]byte
	binary.LittleEndian.PutUint64(prefix[:], uint64(h.Len()))
	bw.Write(prefix[:])
	bw.Write(h.Bytes())
	const synthBlock = 1 << 20
	vals := make([]float32, synthBlock)
	raw := make([]byte, synthBlock*esize)
	for _, s := range specs {
		for left := s.size(); left > 0; {
			n := min(left, synthBlock)
			s.fill(rng, vals[:n])
			for i, v := range vals[:n] {
				switch dtype {
				case "F32":
					binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(v))
				case "F16":
					binary.LittleEndian.PutUint16(raw[2*i:], tensor.Float32ToFloat16(v))
				case "BF16":
					binary.LittleEndian.PutUint16(raw[2*i:], tensor.Float32ToBFloat16(v))
				}
			}
			if _, err := bw.Write(raw[:n*esize]); err != nil {
				return err
			}
			left -= n
		}
	}
	return bw.Flush()
}
