package model

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"linearpatch/internal/atomicfile"
	"linearpatch/model/tensor"
)

// PatchTensorName is the tensor under which an exported model stores its linear patch.
const PatchTensorName = "model.linear_patch.weight"

// Save writes m as a Hugging Face directory into dir (created if missing): config.json and
// model.safetensors. Weight matrices keep their dtype (a BF16 or F16 matrix is written
// bit for bit), vectors are written in m.VectorDType (exact: they were widened from it), and
// the patch is F32. All parts must be loaded. A llama2.c model is written with the
// "llama" model_type (its rotary layout was converted on load). A patch, when present, is
// stored as PatchTensorName and announced by the "linear_patch" key of config.json. Files
// are written atomically; callers that need the whole directory to appear at once write
// to a temporary directory and rename it.
func (m *Model) Save(dir string) error {
	if m.Embed == nil || m.Head == nil || m.Norm == nil {
		return fmt.Errorf("model: save: embeddings, final norm and head must be loaded")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("model: save: %w", err)
	}
	var ts []NamedTensor
	// add writes a vector (or, through addMat, a float32 matrix) in m.VectorDType.
	add := func(name string, data []float32, shape ...int) {
		ts = append(ts, NamedTensor{Name: name, Shape: shape, Data: data, DType: m.VectorDType.String()})
	}
	addMat := func(name string, w *tensor.Matrix) {
		t := NamedTensor{Name: name, Shape: []int{w.Rows, w.Cols}, Data: w.Data}
		if w.IsHalf() {
			t.Data, t.Half, t.DType = nil, w.Half, w.DType.String()
		}
		ts = append(ts, t)
	}
	c := m.Config
	addMat("model.embed_tokens.weight", m.Embed)
	for l, ly := range m.Layers {
		if ly == nil {
			return fmt.Errorf("model: save: layer %d was not loaded", l)
		}
		p := fmt.Sprintf("model.layers.%d.", l)
		add(p+"input_layernorm.weight", ly.AttnNorm, c.Dim)
		addMat(p+"self_attn.q_proj.weight", ly.Wq)
		addMat(p+"self_attn.k_proj.weight", ly.Wk)
		addMat(p+"self_attn.v_proj.weight", ly.Wv)
		if ly.Bq != nil {
			add(p+"self_attn.q_proj.bias", ly.Bq, len(ly.Bq))
			add(p+"self_attn.k_proj.bias", ly.Bk, len(ly.Bk))
			add(p+"self_attn.v_proj.bias", ly.Bv, len(ly.Bv))
		}
		if ly.QNorm != nil {
			add(p+"self_attn.q_norm.weight", ly.QNorm, len(ly.QNorm))
			add(p+"self_attn.k_norm.weight", ly.KNorm, len(ly.KNorm))
		}
		addMat(p+"self_attn.o_proj.weight", ly.Wo)
		add(p+"post_attention_layernorm.weight", ly.MLPNorm, c.Dim)
		addMat(p+"mlp.gate_proj.weight", ly.Wgate)
		addMat(p+"mlp.up_proj.weight", ly.Wup)
		addMat(p+"mlp.down_proj.weight", ly.Wdown)
	}
	add("model.norm.weight", m.Norm, c.Dim)
	if !c.TiedHead {
		addMat("lm_head.weight", m.Head)
	}
	var spec *PatchSpec
	if m.Patch != nil {
		spec = &PatchSpec{Before: m.Patch.Before, Tensor: PatchTensorName}
		ts = append(ts, NamedTensor{Name: PatchTensorName, Shape: []int{c.Dim, c.Dim}, Data: m.Patch.P.Data})
	}
	if err := WriteSafetensors(filepath.Join(dir, "model.safetensors"), ts, map[string]string{"format": "pt"}); err != nil {
		return err
	}
	hf := m.Config.hf(spec)
	if m.Embed.IsHalf() {
		hf["torch_dtype"] = map[tensor.DType]string{tensor.BF16: "bfloat16", tensor.F16: "float16"}[m.Embed.DType]
	}
	cfg, err := json.MarshalIndent(hf, "", "  ")
	if err != nil {
		return fmt.Errorf("model: save: %w", err)
	}
	return atomicfile.Write(filepath.Join(dir, "config.json"), append(cfg, '\n'), 0o644)
}

// hf returns the config.json form of c.
func (c Config) hf(patch *PatchSpec) map[string]any {
	arch := c.Arch
	if arch == "llama2c" {
		arch = "llama"
	}
	archName := map[string]string{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
	out := map[string]any{
		"architectures":           []string{archName},
		"model_type":              arch,
		"hidden_size":             c.Dim,
		"intermediate_size":       c.FFN,
		"num_hidden_layers":       c.Layers,
		"num_attention_heads":     c.Heads,
		"num_key_value_heads":     c.KVHeads,
		"head_dim":                c.HeadDim,
		"vocab_size":              c.Vocab,
		"max_position_embeddings": max(c.MaxSeq, 1),
		"rms_norm_eps":            c.NormEps,
		"rope_theta":              c.RopeTheta,
		"hidden_act":              "silu",
		"tie_word_embeddings":     c.TiedHead,
		"bos_token_id":            c.BOS,
		"eos_token_id":            c.EOS,
		"torch_dtype":             "float32",
		"attention_bias":          false, // Qwen2's q/k/v biases come with its model_type
	}
	if c.Scaling != nil {
		out["rope_scaling"] = c.Scaling
	}
	if arch == "mistral" { // an absent key would mean transformers' default window, 4096
		out["sliding_window"] = nil
		if c.SlidingWindow > 0 {
			out["sliding_window"] = c.SlidingWindow
		}
	}
	if patch != nil {
		out["linear_patch"] = patch
	}
	return out
}
