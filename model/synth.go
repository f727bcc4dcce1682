package model

import (
	"math"
	"math/rand/v2"

	"linearpatch/model/tensor"
)

// Synthetic returns a model with the given configuration and seeded random weights:
// projections drawn from N(0, 1/fan_in) (so activations keep a sane scale through depth),
// norms at 1 ± 0.1, embeddings N(0, 1). The same config and seed give the same weights.
func Synthetic(cfg Config, seed uint64) (*Model, error) {
	if cfg.Arch == "" {
		cfg.Arch = "llama"
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
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	rng := rand.New(rand.NewPCG(seed, 0x6c696e6561727061))
	normal := func(rows, cols int, std float64) *tensor.Matrix {
		m := tensor.New(rows, cols)
		for i := range m.Data {
			m.Data[i] = float32(rng.NormFloat64() * std)
		}
		return m
	}
	norm := func(n int) []float32 {
		v := make([]float32, n)
		for i := range v {
			v[i] = float32(1 + 0.1*(2*rng.Float64()-1))
		}
		return v
	}
	bias := func(n int) []float32 {
		if !cfg.QKVBias {
			return nil
		}
		return normal(1, n, 0.02).Data
	}
	d, hd := cfg.Dim, cfg.HeadDim
	in := func(fan int) float64 { return 1 / math.Sqrt(float64(fan)) }
	m := &Model{Config: cfg, rope: &ropeCache{}}
	m.Embed = normal(cfg.Vocab, d, 1)
	for range cfg.Layers {
		m.Layers = append(m.Layers, &Layer{
			AttnNorm: norm(d),
			Wq:       normal(cfg.Heads*hd, d, in(d)),
			Wk:       normal(cfg.KVHeads*hd, d, in(d)),
			Wv:       normal(cfg.KVHeads*hd, d, in(d)),
			Bq:       bias(cfg.Heads * hd),
			Bk:       bias(cfg.KVHeads * hd),
			Bv:       bias(cfg.KVHeads * hd),
			Wo:       normal(d, cfg.Heads*hd, in(cfg.Heads*hd)),
			MLPNorm:  norm(d),
			Wgate:    normal(cfg.FFN, d, in(d)),
			Wup:      normal(cfg.FFN, d, in(d)),
			Wdown:    normal(d, cfg.FFN, in(cfg.FFN)),
		})
	}
	m.Norm = norm(d)
	if cfg.TiedHead {
		m.Head = m.Embed
	} else {
		m.Head = normal(cfg.Vocab, d, in(d))
	}
	return m, nil
}
