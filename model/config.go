package model

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
)

// ErrConfig is wrapped by every error about an invalid or unsupported model configuration.
var ErrConfig = errors.New("model: invalid config")

// RopeScaling is the LLaMA-3 ("llama3") frequency scaling of rotary embeddings.
type RopeScaling struct {
	Type                          string  `json:"rope_type"`
	Factor                        float64 `json:"factor"`
	LowFreqFactor                 float64 `json:"low_freq_factor"`
	HighFreqFactor                float64 `json:"high_freq_factor"`
	OriginalMaxPositionEmbeddings int     `json:"original_max_position_embeddings"`
}

// Config holds a LLaMA-family model's hyper-parameters, filled once by a loader.
type Config struct {
	Arch      string // "llama", "mistral", "qwen2", "qwen3" or "llama2c"
	Dim       int    // hidden size d
	FFN       int    // intermediate size of the SwiGLU MLP
	Layers    int    // number of transformer layers L
	Heads     int    // attention heads
	KVHeads   int    // key/value heads (grouped-query attention when < Heads)
	HeadDim   int    // per-head dimension
	Vocab     int    // vocabulary size
	MaxSeq    int    // max_position_embeddings (0: unknown)
	NormEps   float32
	RopeTheta float64
	Scaling   *RopeScaling // nil: no rope scaling
	TiedHead  bool         // lm_head shares the embedding matrix
	QKVBias   bool         // q/k/v projections carry a bias (Qwen2)
	QKNorm    bool         // per-head RMSNorm of q and k before RoPE, eps NormEps (Qwen3)

	// SlidingWindow, when > 0, limits attention to the last SlidingWindow positions: key s
	// is visible to query t iff t − SlidingWindow < s ≤ t (Mistral). 0: full causal.
	SlidingWindow int
	BOS, EOS      int

	// LinearPatch, when set, says the model carries a d×d patch (see Patch); it is read
	// from the "linear_patch" key that `linearpatch prune` writes into config.json.
	LinearPatch *PatchSpec
}

// PatchSpec locates a linear patch in a model directory: the tensor named Tensor (d×d,
// applied as x·P) acts on the hidden state entering layer Before of the pruned model.
type PatchSpec struct {
	Before int    `json:"before"`
	Tensor string `json:"tensor"`
}

// hfConfig mirrors the keys of a Hugging Face config.json that the engine reads.
type hfConfig struct {
	ModelType        string          `json:"model_type"`
	Architectures    []string        `json:"architectures"`
	HiddenSize       int             `json:"hidden_size"`
	Intermediate     int             `json:"intermediate_size"`
	NumLayers        int             `json:"num_hidden_layers"`
	NumHeads         int             `json:"num_attention_heads"`
	NumKVHeads       int             `json:"num_key_value_heads"`
	HeadDim          int             `json:"head_dim"`
	VocabSize        int             `json:"vocab_size"`
	MaxPos           int             `json:"max_position_embeddings"`
	RMSNormEps       *float64        `json:"rms_norm_eps"`
	RopeTheta        *float64        `json:"rope_theta"`
	RopeScaling      json.RawMessage `json:"rope_scaling"`
	TieWordEmbedding *bool           `json:"tie_word_embeddings"`
	AttentionBias    bool            `json:"attention_bias"`
	MLPBias          bool            `json:"mlp_bias"`
	SlidingWindow    json.RawMessage `json:"sliding_window"`
	UseSlidingWindow bool            `json:"use_sliding_window"`
	LayerTypes       []string        `json:"layer_types"`
	HiddenAct        string          `json:"hidden_act"`
	BOS              json.RawMessage `json:"bos_token_id"`
	EOS              json.RawMessage `json:"eos_token_id"`
	LinearPatch      *PatchSpec      `json:"linear_patch"`
}

// ReadConfig parses a Hugging Face config.json for LLaMA-2/3, Mistral, Qwen2 or Qwen3.
func ReadConfig(path string) (Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("model: read config: %w", err)
	}
	c, err := ParseConfig(b)
	if err != nil {
		return Config{}, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// ParseConfig parses the bytes of a Hugging Face config.json. A configuration the engine
// cannot honour exactly (another model_type, activation or rope_type, biases other than
// Qwen2's q/k/v ones, Qwen's sliding-window layers) is refused with an error wrapping
// ErrConfig rather than run approximately. Absent keys take transformers' defaults
// (rms_norm_eps 1e-6, rope_theta 10000, Mistral's sliding_window 4096, Qwen3's head_dim
// 128); a present rms_norm_eps or rope_theta must be positive.
func ParseConfig(b []byte) (Config, error) {
	var h hfConfig
	if err := json.Unmarshal(b, &h); err != nil {
		return Config{}, fmt.Errorf("%w: malformed JSON: %v", ErrConfig, err)
	}
	c := Config{
		Arch:    h.ModelType,
		Dim:     h.HiddenSize,
		FFN:     h.Intermediate,
		Layers:  h.NumLayers,
		Heads:   h.NumHeads,
		KVHeads: h.NumKVHeads,
		HeadDim: h.HeadDim,
		Vocab:   h.VocabSize,
		MaxSeq:  h.MaxPos,
		// transformers' defaults for LLaMA, Mistral, Qwen2 and Qwen3 when the key is absent
		NormEps:   1e-6,
		RopeTheta: 10000,
		TiedHead:  h.TieWordEmbedding != nil && *h.TieWordEmbedding,
		QKVBias:   h.ModelType == "qwen2",
		QKNorm:    h.ModelType == "qwen3",
		BOS:       firstTokenID(h.BOS, 1),
		EOS:       firstTokenID(h.EOS, 2),

		LinearPatch: h.LinearPatch,
	}
	switch c.Arch {
	case "llama", "mistral", "qwen2", "qwen3":
	case "":
		return Config{}, fmt.Errorf("%w: model_type missing", ErrConfig)
	default:
		return Config{}, fmt.Errorf("%w: model_type %q is not a supported LLaMA-family model (llama, mistral, qwen2, qwen3)", ErrConfig, c.Arch)
	}
	if h.HiddenAct != "" && h.HiddenAct != "silu" {
		return Config{}, fmt.Errorf("%w: hidden_act %q unsupported (only silu)", ErrConfig, h.HiddenAct)
	}
	if h.RMSNormEps != nil {
		if !(*h.RMSNormEps > 0) {
			return Config{}, fmt.Errorf("%w: rms_norm_eps %v must be positive", ErrConfig, *h.RMSNormEps)
		}
		c.NormEps = float32(*h.RMSNormEps)
	}
	if h.RopeTheta != nil {
		if !(*h.RopeTheta > 0) {
			return Config{}, fmt.Errorf("%w: rope_theta %v must be positive", ErrConfig, *h.RopeTheta)
		}
		c.RopeTheta = *h.RopeTheta
	}
	if h.MLPBias {
		return Config{}, fmt.Errorf("%w: mlp_bias: true is unsupported (no MLP biases)", ErrConfig)
	}
	if h.AttentionBias && c.Arch != "qwen2" {
		// LLaMA and Qwen3 then bias o_proj too; Mistral ignores the key. Neither is a
		// checkpoint the engine has been checked against.
		return Config{}, fmt.Errorf("%w: attention_bias: true is unsupported for model_type %s (only Qwen2's q/k/v biases)", ErrConfig, c.Arch)
	}
	switch c.Arch {
	case "mistral":
		// transformers' MistralConfig: an absent key means 4096, null means no window.
		switch w := string(h.SlidingWindow); w {
		case "":
			c.SlidingWindow = 4096
		case "null":
		default:
			var n int
			if err := json.Unmarshal(h.SlidingWindow, &n); err != nil || n <= 0 {
				return Config{}, fmt.Errorf("%w: sliding_window %s must be a positive integer (or null)", ErrConfig, w)
			}
			c.SlidingWindow = n
		}
	case "qwen2", "qwen3":
		// Qwen ignores sliding_window unless use_sliding_window is set, and then applies it
		// to some layers only (max_window_layers): not implemented.
		if h.UseSlidingWindow {
			return Config{}, fmt.Errorf("%w: use_sliding_window: true is unsupported for %s (per-layer sliding windows)", ErrConfig, c.Arch)
		}
	}
	for i, lt := range h.LayerTypes {
		if lt != "full_attention" {
			return Config{}, fmt.Errorf("%w: layer_types[%d] %q unsupported (only full_attention)", ErrConfig, i, lt)
		}
	}
	if c.KVHeads == 0 {
		c.KVHeads = c.Heads
	}
	switch {
	case c.HeadDim == 0 && c.Arch == "qwen3":
		c.HeadDim = 128 // transformers' Qwen3Config default, whatever hidden_size is
	case c.HeadDim == 0 && c.Heads > 0:
		c.HeadDim = c.Dim / c.Heads
	}
	if len(h.RopeScaling) > 0 && string(h.RopeScaling) != "null" {
		var s RopeScaling
		var alt struct {
			Type string `json:"type"`
		}
		if err := json.Unmarshal(h.RopeScaling, &s); err != nil {
			return Config{}, fmt.Errorf("%w: rope_scaling: %v", ErrConfig, err)
		}
		_ = json.Unmarshal(h.RopeScaling, &alt)
		if s.Type == "" {
			s.Type = alt.Type
		}
		switch s.Type {
		case "llama3":
			c.Scaling = &s
		case "default":
		default:
			return Config{}, fmt.Errorf("%w: rope_scaling type %q unsupported (only llama3)", ErrConfig, s.Type)
		}
	}
	return c, c.Validate()
}

func firstTokenID(raw json.RawMessage, def int) int {
	var one int
	if json.Unmarshal(raw, &one) == nil {
		return one
	}
	var many []int
	if json.Unmarshal(raw, &many) == nil && len(many) > 0 {
		return many[0]
	}
	return def
}

// Validate checks that the hyper-parameters describe a model the engine can run.
func (c Config) Validate() error {
	switch {
	case c.Dim <= 0 || c.FFN <= 0 || c.Layers <= 0 || c.Heads <= 0 || c.Vocab <= 0 || c.HeadDim <= 0:
		return fmt.Errorf("%w: hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, head_dim and vocab_size must be positive (got %d, %d, %d, %d, %d, %d)",
			ErrConfig, c.Dim, c.FFN, c.Layers, c.Heads, c.HeadDim, c.Vocab)
	case c.KVHeads <= 0 || c.Heads%c.KVHeads != 0:
		return fmt.Errorf("%w: num_attention_heads %d is not a multiple of num_key_value_heads %d", ErrConfig, c.Heads, c.KVHeads)
	case c.HeadDim%2 != 0:
		return fmt.Errorf("%w: head_dim %d must be even for rotary embeddings", ErrConfig, c.HeadDim)
	case !(c.NormEps > 0) || math.IsInf(float64(c.NormEps), 0):
		return fmt.Errorf("%w: rms_norm_eps %v must be positive", ErrConfig, c.NormEps)
	case !(c.RopeTheta > 0) || math.IsInf(c.RopeTheta, 0):
		return fmt.Errorf("%w: rope_theta %v must be positive", ErrConfig, c.RopeTheta)
	case c.SlidingWindow < 0:
		return fmt.Errorf("%w: sliding_window %d must be positive (0: none)", ErrConfig, c.SlidingWindow)
	case c.SlidingWindow > 0 && c.Arch != "mistral":
		return fmt.Errorf("%w: a sliding window needs model_type mistral, not %q", ErrConfig, c.Arch)
	case c.QKNorm != (c.Arch == "qwen3"):
		return fmt.Errorf("%w: q/k norm goes with model_type qwen3 and only with it (model_type %q)", ErrConfig, c.Arch)
	case c.QKVBias != (c.Arch == "qwen2"):
		return fmt.Errorf("%w: q/k/v biases go with model_type qwen2 and only with it (model_type %q)", ErrConfig, c.Arch)
	case c.LinearPatch != nil && (c.LinearPatch.Before < 0 || c.LinearPatch.Before > c.Layers || c.LinearPatch.Tensor == ""):
		return fmt.Errorf("%w: linear_patch needs 0 ≤ before ≤ num_hidden_layers (%d) and a tensor name", ErrConfig, c.Layers)
	case c.Scaling != nil && (c.Scaling.Factor <= 0 || c.Scaling.LowFreqFactor <= 0 || c.Scaling.HighFreqFactor <= c.Scaling.LowFreqFactor || c.Scaling.OriginalMaxPositionEmbeddings <= 0):
		return fmt.Errorf("%w: llama3 rope_scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and original_max_position_embeddings > 0", ErrConfig)
	}
	return nil
}

// InvFreq returns the rotary inverse frequencies θ^(−2i/head_dim), i < head_dim/2, with the
// LLaMA-3 scaling applied when configured (as in transformers' _compute_llama3_parameters).
func (c Config) InvFreq() []float64 {
	half := c.HeadDim / 2
	f := make([]float64, half)
	for i := range f {
		f[i] = 1 / math.Pow(c.RopeTheta, float64(2*i)/float64(c.HeadDim))
	}
	s := c.Scaling
	if s == nil {
		return f
	}
	lowWavelen := float64(s.OriginalMaxPositionEmbeddings) / s.LowFreqFactor
	highWavelen := float64(s.OriginalMaxPositionEmbeddings) / s.HighFreqFactor
	for i, v := range f {
		wavelen := 2 * math.Pi / v
		switch {
		case wavelen < highWavelen:
		case wavelen > lowWavelen:
			f[i] = v / s.Factor
		default:
			smooth := (float64(s.OriginalMaxPositionEmbeddings)/wavelen - s.LowFreqFactor) / (s.HighFreqFactor - s.LowFreqFactor)
			f[i] = (1-smooth)*v/s.Factor + smooth*v
		}
	}
	return f
}
