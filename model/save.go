package model

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

// PatchTensorName is the tensor under which an exported model stores its linear patch.
const PatchTensorName = "model.linear_patch.weight"

// Save writes m as a Hugging Face directory into dir (created if missing): config.json and
// model.safetensors (F32). All parts must be loaded. A llama2.c model is written with the
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
	add := func(name string, data []float32, shape ...int) {
		ts = append(ts, NamedTensor{Name: name, Shape: shape, Data: data})
	}
	c := m.Config
	add("model.embed_tokens.weight", m.Embed.Data, c.Vocab, c.Dim)
	for l, ly := range m.Layers {
		if ly == nil {
			return fmt.Errorf("model: save: layer %d was not loaded", l)
		}
		p := fmt.Sprintf("model.layers.%d.", l)
		add(p+"input_layernorm.weight", ly.AttnNorm, c.Dim)
		add(p+"self_attn.q_proj.weight", ly.Wq.Data, ly.Wq.Rows, ly.Wq.Cols)
		add(p+"self_attn.k_proj.weight", ly.Wk.Data, ly.Wk.Rows, ly.Wk.Cols)
		add(p+"self_attn.v_proj.weight", ly.Wv.Data, ly.Wv.Rows, ly.Wv.Cols)
		if ly.Bq != nil {
			add(p+"self_attn.q_proj.bias", ly.Bq, len(ly.Bq))
			add(p+"self_attn.k_proj.bias", ly.Bk, len(ly.Bk))
			add(p+"self_attn.v_proj.bias", ly.Bv, len(ly.Bv))
		}
		add(p+"self_attn.o_proj.weight", ly.Wo.Data, ly.Wo.Rows, ly.Wo.Cols)
		add(p+"post_attention_layernorm.weight", ly.MLPNorm, c.Dim)
		add(p+"mlp.gate_proj.weight", ly.Wgate.Data, ly.Wgate.Rows, ly.Wgate.Cols)
		add(p+"mlp.up_proj.weight", ly.Wup.Data, ly.Wup.Rows, ly.Wup.Cols)
		add(p+"mlp.down_proj.weight", ly.Wdown.Data, ly.Wdown.Rows, ly.Wdown.Cols)
	}
	add("model.norm.weight", m.Norm, c.Dim)
	if !c.TiedHead {
		add("lm_head.weight", m.Head.Data, c.Vocab, c.Dim)
	}
	var spec *PatchSpec
	if m.Patch != nil {
		spec = &PatchSpec{Before: m.Patch.Before, Tensor: PatchTensorName}
		add(PatchTensorName, m.Patch.P.Data, c.Dim, c.Dim)
	}
	if err := WriteSafetensors(filepath.Join(dir, "model.safetensors"), ts, map[string]string{"format": "pt"}); err != nil {
		return err
	}
	cfg, err := json.MarshalIndent(m.Config.hf(spec), "", "  ")
	if err != nil {
		return fmt.Errorf("model: save: %w", err)
	}
	return writeFileAtomic(filepath.Join(dir, "config.json"), append(cfg, '\n'))
}

// hf returns the config.json form of c.
func (c Config) hf(patch *PatchSpec) map[string]any {
	arch := c.Arch
	if arch == "llama2c" {
		arch = "llama"
	}
	archName := map[string]string{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
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
		"attention_bias":          c.QKVBias,
	}
	if c.Scaling != nil {
		out["rope_scaling"] = c.Scaling
	}
	if patch != nil {
		out["linear_patch"] = patch
	}
	return out
}

// writeFileAtomic writes data to path through a temporary file in the same directory,
// synced and renamed, so readers see either the old file or the whole new one.
func writeFileAtomic(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("model: write %s: %w", path, err)
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("model: write %s: %w", path, err)
	}
	return nil
}
