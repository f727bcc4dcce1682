package model

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"linearpatch/model/tensor"
)

// ErrWeights is wrapped by errors about missing tensors or tensors whose shape contradicts
// the configuration.
var ErrWeights = errors.New("model: weights do not match the config")

type loadOptions struct {
	from, to int  // layer range to load; to < 0 means all
	noEmbed  bool // skip the embedding matrix
	noHead   bool // skip the final norm and head
	readLog  *[]string
}

// LoadOption tunes Load.
type LoadOption func(*loadOptions) error

// WithLayers loads only layers [from, to); the others stay nil in Model.Layers.
func WithLayers(from, to int) LoadOption {
	return func(o *loadOptions) error {
		if from < 0 || to < from {
			return fmt.Errorf("model: WithLayers(%d, %d): invalid range", from, to)
		}
		o.from, o.to = from, to
		return nil
	}
}

// WithoutEmbeddings skips the token embeddings (a student that starts from cached states).
func WithoutEmbeddings() LoadOption {
	return func(o *loadOptions) error { o.noEmbed = true; return nil }
}

// WithoutHead skips the final norm and the head (a teacher that stops at the cut).
func WithoutHead() LoadOption {
	return func(o *loadOptions) error { o.noHead = true; return nil }
}

// WithReadLog appends the name of every tensor Load reads to *log.
func WithReadLog(log *[]string) LoadOption {
	return func(o *loadOptions) error { o.readLog = log; return nil }
}

// Load reads a model: a Hugging Face directory (config.json + model.safetensors or a sharded
// model.safetensors.index.json) or a llama2.c .bin checkpoint. Tensors of any supported dtype
// become float32. Only the parts asked for are read.
func Load(path string, opts ...LoadOption) (*Model, error) {
	o := loadOptions{to: -1}
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("model: %w", err)
	}
	var (
		cfg Config
		src TensorSource
	)
	if st.IsDir() {
		cfg, err = ReadConfig(filepath.Join(path, "config.json"))
		if err != nil {
			return nil, err
		}
		src, err = OpenSafetensorsDir(path)
		if err != nil {
			return nil, err
		}
	} else {
		var ms *MapSource
		cfg, ms, err = OpenLlama2c(path)
		if err != nil {
			return nil, err
		}
		src = ms
	}
	defer src.Close()
	m, err := build(cfg, src, o)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return m, nil
}

// FromSource builds a model from a configuration and a tensor source (all parts).
func FromSource(cfg Config, src TensorSource) (*Model, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return build(cfg, src, loadOptions{to: -1})
}

func build(cfg Config, src TensorSource, o loadOptions) (*Model, error) {
	m := &Model{Config: cfg, Layers: make([]*Layer, cfg.Layers), rope: &ropeCache{}}
	from, to := o.from, o.to
	if to < 0 {
		to = cfg.Layers
	}
	if to > cfg.Layers {
		return nil, fmt.Errorf("%w: layers [%d, %d) requested but the model has %d", ErrConfig, from, to, cfg.Layers)
	}
	r := reader{src: src, log: o.readLog}
	d, hd := cfg.Dim, cfg.HeadDim
	if !o.noEmbed {
		m.Embed = r.matrix("model.embed_tokens.weight", cfg.Vocab, d)
	}
	for l := from; l < to; l++ {
		p := fmt.Sprintf("model.layers.%d.", l)
		ly := &Layer{
			AttnNorm: r.vector(p+"input_layernorm.weight", d),
			Wq:       r.matrix(p+"self_attn.q_proj.weight", cfg.Heads*hd, d),
			Wk:       r.matrix(p+"self_attn.k_proj.weight", cfg.KVHeads*hd, d),
			Wv:       r.matrix(p+"self_attn.v_proj.weight", cfg.KVHeads*hd, d),
			Wo:       r.matrix(p+"self_attn.o_proj.weight", d, cfg.Heads*hd),
			MLPNorm:  r.vector(p+"post_attention_layernorm.weight", d),
			Wgate:    r.matrix(p+"mlp.gate_proj.weight", cfg.FFN, d),
			Wup:      r.matrix(p+"mlp.up_proj.weight", cfg.FFN, d),
			Wdown:    r.matrix(p+"mlp.down_proj.weight", d, cfg.FFN),
		}
		if cfg.QKVBias {
			ly.Bq = r.vector(p+"self_attn.q_proj.bias", cfg.Heads*hd)
			ly.Bk = r.vector(p+"self_attn.k_proj.bias", cfg.KVHeads*hd)
			ly.Bv = r.vector(p+"self_attn.v_proj.bias", cfg.KVHeads*hd)
		}
		m.Layers[l] = ly
	}
	if !o.noHead {
		m.Norm = r.vector("model.norm.weight", d)
		switch {
		case !cfg.TiedHead:
			m.Head = r.matrix("lm_head.weight", cfg.Vocab, d)
		case m.Embed != nil:
			m.Head = m.Embed
		default:
			m.Head = r.matrix("model.embed_tokens.weight", cfg.Vocab, d)
		}
	}
	if ps := cfg.LinearPatch; ps != nil {
		m.Patch = &Patch{Before: ps.Before, P: r.matrix(ps.Tensor, d, d)}
	}
	if r.err != nil {
		return nil, r.err
	}
	return m, nil
}

// reader reads tensors from a source and checks their shapes, keeping the first error.
type reader struct {
	src TensorSource
	log *[]string
	err error
}

func (r *reader) read(name string, shape ...int) []float32 {
	if r.err != nil {
		return nil
	}
	got, ok := r.src.Shape(name)
	if !ok {
		r.err = fmt.Errorf("%w: tensor %s is missing", ErrWeights, name)
		return nil
	}
	if !sameShape(got, shape) {
		r.err = fmt.Errorf("%w: tensor %s has shape %v, config.json implies %v", ErrWeights, name, got, shape)
		return nil
	}
	data, _, err := r.src.ReadTensor(name)
	if err != nil {
		r.err = err
		return nil
	}
	if r.log != nil {
		*r.log = append(*r.log, name)
	}
	return data
}

func (r *reader) matrix(name string, rows, cols int) *tensor.Matrix {
	data := r.read(name, rows, cols)
	if data == nil {
		return nil
	}
	return tensor.FromData(rows, cols, data)
}

func (r *reader) vector(name string, n int) []float32 { return r.read(name, n) }

func sameShape(got, want []int) bool {
	if len(got) != len(want) {
		return false
	}
	for i := range got {
		if got[i] != want[i] {
			return false
		}
	}
	return true
}

// ReadModelConfig returns the configuration of the model at path without keeping its
// weights: config.json of a Hugging Face directory, the header of a llama2.c checkpoint.
func ReadModelConfig(path string) (Config, error) {
	if path == "" {
		return Config{}, fmt.Errorf("%w: no model path given", ErrConfig)
	}
	st, err := os.Stat(path)
	if err != nil {
		return Config{}, fmt.Errorf("model: %w", err)
	}
	if st.IsDir() {
		return ReadConfig(filepath.Join(path, "config.json"))
	}
	cfg, src, err := OpenLlama2c(path)
	if err != nil {
		return Config{}, err
	}
	src.Close()
	return cfg, nil
}
