package model

import "linearpatch/model/tensor"

// Layer is one transformer block: pre-norm grouped-query attention and a pre-norm SwiGLU MLP.
// Projection weights are stored as Hugging Face stores them, [out, in], so y = x·Wᵀ.
type Layer struct {
	AttnNorm   []float32      // input_layernorm.weight, d
	Wq, Wk, Wv *tensor.Matrix // [heads·hd, d], [kv·hd, d], [kv·hd, d]
	Bq, Bk, Bv []float32      // q/k/v biases (Qwen2); nil when absent
	QNorm      []float32      // q_norm.weight, hd: per-head RMSNorm of q before RoPE (Qwen3); nil when absent
	KNorm      []float32      // k_norm.weight, hd: the same for k
	Wo         *tensor.Matrix // [d, heads·hd]
	MLPNorm    []float32      // post_attention_layernorm.weight, d
	Wgate, Wup *tensor.Matrix // [ffn, d]
	Wdown      *tensor.Matrix // [d, ffn]
}

// Model is a LLaMA-family decoder. Parts that were not loaded (see LoadOptions) are nil:
// Layers[i] == nil for a layer that was not read, Embed == nil without embeddings, Head
// == nil without the head.
type Model struct {
	Config
	Embed  *tensor.Matrix // [vocab, d]
	Layers []*Layer       // len == Config.Layers
	Norm   []float32      // final RMSNorm weight, d
	Head   *tensor.Matrix // [vocab, d]; aliases Embed when TiedHead

	Patch *Patch // a linear patch applied inside the layer stack; nil for none

	// VectorDType is the dtype the checkpoint stored the norm weights and biases in, when
	// they all shared one (F32 otherwise, and for models not read from safetensors). They
	// are held as float32 (widened exactly); Save writes them back in this dtype.
	VectorDType tensor.DType

	rope *ropeCache // rotary tables, shared by views of the same weights
}
