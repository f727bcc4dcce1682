package model

import (
	"context"
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
// model.safetensors.index.json) or a llama2.c .bin checkpoint. Only the parts asked for are
// read. Weight matrices (embeddings, projections, head) stored as BF16 or F16 stay in that
// dtype, two bytes per weight, mapped from the safetensors files where the platform allows
// (so their pages are read from the file as the forward first touches them; the files must
// not be truncated or rewritten in place while the model is in use); MulT widens them block
// by block. Float32 tensors, norm weights, biases and a linear patch become float32.
func Load(path string, opts ...LoadOption) (*Model, error) {
	return LoadContext(context.Background(), path, opts...)
}

// LoadContext is Load that checks ctx between tensors: once ctx ends it stops reading and
// returns ctx's error (wrapped, with the path).
func LoadContext(ctx context.Context, path string, opts ...LoadOption) (*Model, error) {
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
	m, err := build(ctx, cfg, src, o)
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
	return build(context.Background(), cfg, src, loadOptions{to: -1})
}

// layerPrefix names the tensors of layer l.
func layerPrefix(l int) string { return fmt.Sprintf("model.layers.%d.", l) }

// checkLayerCount checks that src holds the last layer cfg names, so that a config claiming
// more layers than the weights hold is refused before anything is sized by it.
func checkLayerCount(cfg Config, src TensorSource) error {
	name := layerPrefix(cfg.Layers-1) + "input_layernorm.weight"
	if _, ok := src.Shape(name); !ok {
		return fmt.Errorf("%w: config.json says num_hidden_layers %d but tensor %s is missing", ErrWeights, cfg.Layers, name)
	}
	return nil
}

func build(ctx context.Context, cfg Config, src TensorSource, o loadOptions) (*Model, error) {
	from, to := o.from, o.to
	if to < 0 {
		to = cfg.Layers
	}
	if to > cfg.Layers {
		return nil, fmt.Errorf("%w: layers [%d, %d) requested but the model has %d", ErrConfig, from, to, cfg.Layers)
	}
	if err := checkLayerCount(cfg, src); err != nil {
		return nil, err
	}
	m := &Model{Config: cfg, Layers: make([]*Layer, cfg.Layers), rope: &ropeCache{}}
	r := reader{ctx: ctx, src: src, log: o.readLog}
	d, hd := cfg.Dim, cfg.HeadDim
	if !o.noEmbed {
		m.Embed = r.matrix("model.embed_tokens.weight", cfg.Vocab, d)
	}
	for l := from; l < to && r.err == nil; l++ {
		p := layerPrefix(l)
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
		if cfg.QKNorm {
			ly.QNorm = r.vector(p+"self_attn.q_norm.weight", hd)
			ly.KNorm = r.vector(p+"self_attn.k_norm.weight", hd)
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
		// The patch is multiplied as a right-hand side of Mul, which wants float32.
		m.Patch = &Patch{Before: ps.Before, P: r.matrixF32(ps.Tensor, d, d)}
	}
	if r.err != nil {
		return nil, r.err
	}
	m.VectorDType = r.vectorDType()
	return m, nil
}

// reader reads tensors from a source and checks their shapes, keeping the first error;
// once ctx ends it reads nothing more and keeps ctx's error.
type reader struct {
	ctx context.Context
	src TensorSource
	log *[]string
	err error

	vecDType tensor.DType // stored dtype shared by the vectors read so far
	vecMixed bool         // the vectors read so far do not share one dtype
	vecsSeen bool
}

// check reports whether name exists with the given shape, recording an error otherwise.
func (r *reader) check(name string, shape ...int) bool {
	if r.err != nil {
		return false
	}
	if err := r.ctx.Err(); err != nil {
		r.err = fmt.Errorf("model: loading stopped before %s: %w", name, err)
		return false
	}
	got, ok := r.src.Shape(name)
	if !ok {
		r.err = fmt.Errorf("%w: tensor %s is missing", ErrWeights, name)
		return false
	}
	if !sameShape(got, shape) {
		r.err = fmt.Errorf("%w: tensor %s has shape %v, config.json implies %v", ErrWeights, name, got, shape)
		return false
	}
	return true
}

func (r *reader) read(name string, shape ...int) []float32 {
	if !r.check(name, shape...) {
		return nil
	}
	data, _, err := r.src.ReadTensor(name)
	if err != nil {
		r.err = err
		return nil
	}
	r.logRead(name)
	return data
}

func (r *reader) logRead(name string) {
	if r.log != nil {
		*r.log = append(*r.log, name)
	}
}

// matrix reads a weight matrix, kept in its stored dtype: a BF16 or F16 tensor of a source
// that can hand out its bits (safetensors) stays half precision, anything else is float32.
func (r *reader) matrix(name string, rows, cols int) *tensor.Matrix {
	if hr, ok := r.src.(halfReader); ok && r.check(name, rows, cols) {
		dt, data, owner, ok, err := hr.readHalf(name)
		if err != nil {
			r.err = err
			return nil
		}
		if ok {
			r.logRead(name)
			return tensor.FromHalf(rows, cols, dt, data, owner)
		}
	}
	return r.matrixF32(name, rows, cols)
}

// matrixF32 reads a matrix widened to float32 whatever its stored dtype.
func (r *reader) matrixF32(name string, rows, cols int) *tensor.Matrix {
	data := r.read(name, rows, cols)
	if data == nil {
		return nil
	}
	return tensor.FromData(rows, cols, data)
}

// vector reads a 1-D tensor as float32 (norm weights and biases are small) and notes its
// stored dtype for Model.VectorDType.
func (r *reader) vector(name string, n int) []float32 {
	v := r.read(name, n)
	if v == nil {
		return nil
	}
	dt := tensor.F32
	if d, ok := r.src.(dtyper); ok {
		if s, ok := d.DType(name); ok {
			dt, _ = tensor.ParseDType(s)
		}
	}
	if r.vecsSeen && dt != r.vecDType {
		r.vecMixed = true
	}
	r.vecDType, r.vecsSeen = dt, true
	return v
}

// vectorDType is the dtype Save should write the vectors in: the stored one when every
// vector read had the same, else float32 (which holds any of them exactly).
func (r *reader) vectorDType() tensor.DType {
	if r.vecMixed {
		return tensor.F32
	}
	return r.vecDType
}

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
// weights: config.json of a Hugging Face directory (its layer count checked against the
// tensors the safetensors headers list), the header of a llama2.c checkpoint.
func ReadModelConfig(path string) (Config, error) {
	if path == "" {
		return Config{}, fmt.Errorf("%w: no model path given", ErrConfig)
	}
	st, err := os.Stat(path)
	if err != nil {
		return Config{}, fmt.Errorf("model: %w", err)
	}
	if st.IsDir() {
		cfg, err := ReadConfig(filepath.Join(path, "config.json"))
		if err != nil {
			return Config{}, err
		}
		// The layer count sizes the callers' plans and statistics: check it against the
		// tensors present (headers only) before anyone allocates by it.
		src, err := OpenSafetensorsDir(path)
		if err != nil {
			return Config{}, err
		}
		defer src.Close()
		if err := checkLayerCount(cfg, src); err != nil {
			return Config{}, fmt.Errorf("%s: %w", path, err)
		}
		return cfg, nil
	}
	cfg, src, err := OpenLlama2c(path)
	if err != nil {
		return Config{}, err
	}
	src.Close()
	return cfg, nil
}
