package model

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"
)

// baseConfig is a valid config.json with one key replaced or added per case.
func configJSON(extra string) []byte {
	return []byte(`{"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
		"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
		"vocab_size": 100` + extra + `}`)
}

func TestParseConfigRefuses(t *testing.T) {
	for _, c := range []struct{ name, extra, want string }{
		{"unknown model_type", `, "model_type": "gemma"`, "gemma"},
		{"no model_type", `, "model_type": ""`, "model_type missing"},
		{"gelu", `, "hidden_act": "gelu"`, "gelu"},
		{"linear rope", `, "rope_scaling": {"type": "linear", "factor": 2}`, "linear"},
		{"yarn rope", `, "rope_scaling": {"rope_type": "yarn", "factor": 4}`, "yarn"},
		{"dynamic rope", `, "rope_scaling": {"rope_type": "dynamic", "factor": 4}`, "dynamic"},
		{"llama3 rope without factors", `, "rope_scaling": {"rope_type": "llama3"}`, "llama3 rope_scaling"},
		{"zero rope_theta", `, "rope_theta": 0`, "rope_theta"},
		{"negative rope_theta", `, "rope_theta": -10000`, "rope_theta"},
		{"zero rms_norm_eps", `, "rms_norm_eps": 0`, "rms_norm_eps"},
		{"negative rms_norm_eps", `, "rms_norm_eps": -1e-5`, "rms_norm_eps"},
		{"qwen2 sliding window", `, "model_type": "qwen2", "use_sliding_window": true, "sliding_window": 32`, "use_sliding_window"},
		{"qwen3 sliding window", `, "model_type": "qwen3", "head_dim": 16, "use_sliding_window": true, "sliding_window": 32`, "use_sliding_window"},
		{"sliding layer types", `, "model_type": "qwen3", "layer_types": ["full_attention", "sliding_attention"]`, "sliding_attention"},
		{"mistral zero window", `, "model_type": "mistral", "sliding_window": 0`, "sliding_window"},
		{"mistral string window", `, "model_type": "mistral", "sliding_window": "48"`, "sliding_window"},
		{"llama attention bias", `, "attention_bias": true`, "attention_bias"},
		{"qwen3 attention bias", `, "model_type": "qwen3", "attention_bias": true`, "attention_bias"},
		{"mlp bias", `, "mlp_bias": true`, "mlp_bias"},
		{"odd head_dim", `, "head_dim": 15`, "even"},
		{"kv heads", `, "num_key_value_heads": 3`, "multiple"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParseConfig(configJSON(c.extra))
			if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want ErrConfig mentioning %q", err, c.want)
			}
		})
	}
}

func TestParseConfigArchitectures(t *testing.T) {
	for _, c := range []struct {
		name, extra string
		check       func(Config) bool
	}{
		{"llama defaults", ``, func(c Config) bool {
			return c.Arch == "llama" && c.NormEps == 1e-6 && c.RopeTheta == 10000 && c.HeadDim == 16 &&
				!c.QKVBias && !c.QKNorm && c.SlidingWindow == 0
		}},
		{"qwen2 bias", `, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": false`, func(c Config) bool {
			return c.QKVBias && !c.QKNorm && c.SlidingWindow == 0
		}},
		{"qwen3 q/k norm", `, "model_type": "qwen3", "head_dim": 48, "sliding_window": null, "layer_types": ["full_attention", "full_attention"]`, func(c Config) bool {
			return c.QKNorm && !c.QKVBias && c.HeadDim == 48
		}},
		{"mistral window", `, "model_type": "mistral", "sliding_window": 48`, func(c Config) bool { return c.SlidingWindow == 48 }},
		{"mistral no window", `, "model_type": "mistral", "sliding_window": null`, func(c Config) bool { return c.SlidingWindow == 0 }},
		{"mistral default window", `, "model_type": "mistral"`, func(c Config) bool { return c.SlidingWindow == 4096 }},
		{"qwen3 default head_dim", `, "model_type": "qwen3"`, func(c Config) bool { return c.HeadDim == 128 }},
		{"llama3 rope", `, "rope_theta": 500000, "rms_norm_eps": 1e-5, "rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4, "original_max_position_embeddings": 8192}`,
			func(c Config) bool { return c.Scaling != nil && c.RopeTheta == 500000 && c.NormEps == 1e-5 }},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg, err := ParseConfig(configJSON(c.extra))
			if err != nil {
				t.Fatal(err)
			}
			if !c.check(cfg) {
				t.Fatalf("%+v", cfg)
			}
		})
	}
	// The real models' configs in ../shared/tokenizers.
	for name, check := range map[string]func(Config) bool{
		"llama3": func(c Config) bool {
			return c.Arch == "llama" && c.Vocab == 128256 && c.RopeTheta == 500000 && c.KVHeads == 8
		},
		"qwen3": func(c Config) bool {
			return c.QKNorm && c.HeadDim == 128 && c.Dim == 1024 && c.TiedHead && c.NormEps == 1e-6
		},
		"mistral": func(c Config) bool { return c.SlidingWindow == 4096 && c.Vocab == 32000 },
	} {
		cfg, err := ReadConfig(sharedPath(t, filepath.Join("tokenizers", name, "config.json")))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !check(cfg) {
			t.Errorf("%s: %+v", name, cfg)
		}
	}
}

// TestValidateArchFeatures: a Config built in Go must name the model_type its features
// need, so that Save writes a config.json that loads back the same model.
func TestValidateArchFeatures(t *testing.T) {
	base := Config{Arch: "llama", Dim: 16, FFN: 32, Layers: 1, Heads: 2, KVHeads: 2, HeadDim: 8, Vocab: 10, NormEps: 1e-5, RopeTheta: 10000}
	for _, c := range []struct {
		name string
		edit func(*Config)
	}{
		{"bias on llama", func(c *Config) { c.QKVBias = true }},
		{"qwen2 without bias", func(c *Config) { c.Arch = "qwen2" }},
		{"q/k norm on llama", func(c *Config) { c.QKNorm = true }},
		{"qwen3 without q/k norm", func(c *Config) { c.Arch = "qwen3" }},
		{"window on llama", func(c *Config) { c.SlidingWindow = 4 }},
		{"negative window", func(c *Config) { c.Arch, c.SlidingWindow = "mistral", -1 }},
		{"zero eps", func(c *Config) { c.NormEps = 0 }},
		{"zero theta", func(c *Config) { c.RopeTheta = 0 }},
	} {
		cfg := base
		c.edit(&cfg)
		if err := cfg.Validate(); !errors.Is(err, ErrConfig) {
			t.Errorf("%s: Validate = %v", c.name, err)
		}
	}
	if err := base.Validate(); err != nil {
		t.Fatal(err)
	}
}

// FuzzParseConfig: any bytes give a config that validates or an error wrapping ErrConfig,
// never a panic.
func FuzzParseConfig(f *testing.F) {
	f.Add(configJSON(``))
	f.Add(configJSON(`, "model_type": "qwen3", "head_dim": 48`))
	f.Add(configJSON(`, "model_type": "mistral", "sliding_window": 48`))
	f.Add(configJSON(`, "model_type": "qwen2", "use_sliding_window": true`))
	f.Add(configJSON(`, "rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4, "original_max_position_embeddings": 8192}`))
	f.Add([]byte(`{"rope_scaling": [1], "bos_token_id": [1, 2], "rope_theta": -1}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseConfig(b)
		if err != nil {
			if !errors.Is(err, ErrConfig) {
				t.Fatalf("error %v does not wrap ErrConfig", err)
			}
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("ParseConfig returned a config that does not validate: %v", err)
		}
	})
}
