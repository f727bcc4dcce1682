package model

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
)

// ErrLlama2c is wrapped by every error about a malformed or unsupported llama2.c checkpoint.
var ErrLlama2c = errors.New("model: bad llama2.c checkpoint")

const (
	llama2cHeaderBytes = 7 * 4
	// llama2cMagic opens the version-1/2 exports of llama2.c's export.py ("ak42").
	llama2cMagic = 0x616b3432
	// llama2cMaxFloats bounds the size a header may imply (1 TiB of fp32), so that the
	// size arithmetic cannot overflow and a corrupt header is reported as such.
	llama2cMaxFloats = 1 << 38
)

// llama2cHeader is the validated header of a legacy (version 0) llama2.c checkpoint.
type llama2cHeader struct {
	dim, hidden, layers, heads, kvHeads, vocab, seqLen int
	shared                                             bool  // classifier shares the embedding
	floats                                             int64 // fp32 values after the header
}

func (h llama2cHeader) headDim() int { return h.dim / h.heads }

// fileSize is the exact size in bytes of a checkpoint with this header.
func (h llama2cHeader) fileSize() int64 { return llama2cHeaderBytes + 4*h.floats }

// parseLlama2cHeader decodes and validates the 28-byte header at the start of b; path
// only labels errors. It never panics.
func parseLlama2cHeader(path string, b []byte) (llama2cHeader, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s: "+format, append([]any{ErrLlama2c, path}, args...)...)
	}
	if len(b) < llama2cHeaderBytes {
		return llama2cHeader{}, bad("file is %d bytes, shorter than the %d-byte header", len(b), llama2cHeaderBytes)
	}
	var f [7]int64
	for i := range f {
		f[i] = int64(int32(binary.LittleEndian.Uint32(b[4*i:])))
	}
	if uint32(f[0]) == llama2cMagic {
		return llama2cHeader{}, bad(`starts with the magic "ak42" of a version-1/2 export; only legacy version-0 checkpoints are supported`)
	}
	h := llama2cHeader{
		dim: int(f[0]), hidden: int(f[1]), layers: int(f[2]), heads: int(f[3]), kvHeads: int(f[4]),
		vocab: int(f[5]), seqLen: int(f[6]), shared: f[5] > 0,
	}
	if h.vocab < 0 {
		h.vocab = -h.vocab // a negative vocab_size flags an unshared classifier (int64: no overflow)
	}
	names := [...]string{"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"}
	for i, v := range [...]int{h.dim, h.hidden, h.layers, h.heads, h.kvHeads, h.vocab, h.seqLen} {
		if v <= 0 {
			return llama2cHeader{}, bad("header field %s = %d must be positive", names[i], f[i])
		}
	}
	switch {
	case h.dim%h.heads != 0:
		return llama2cHeader{}, bad("n_heads %d does not divide dim %d", h.heads, h.dim)
	case h.kvHeads > h.heads || h.heads%h.kvHeads != 0:
		return llama2cHeader{}, bad("n_kv_heads %d does not divide n_heads %d", h.kvHeads, h.heads)
	case h.headDim()%2 != 0:
		return llama2cHeader{}, bad("head size %d (dim/n_heads) must be even for rotary embeddings", h.headDim())
	}
	// Sizes in the order of llama2.c's memory_map_weights (run.c).
	d, l, kv := int64(h.dim), int64(h.layers), int64(h.kvHeads*h.headDim())
	var n int64
	over := false
	add := func(factors ...int64) {
		p := int64(1)
		for _, x := range factors {
			if over || p > llama2cMaxFloats/x {
				over = true
				return
			}
			p *= x
		}
		if n += p; n > llama2cMaxFloats {
			over = true
		}
	}
	add(int64(h.vocab), d)                   // token_embedding_table
	add(l, d)                                // rms_att_weight
	add(l, d, d)                             // wq
	add(2, l, kv, d)                         // wk, wv
	add(l, d, d)                             // wo
	add(l, d)                                // rms_ffn_weight
	add(3, l, int64(h.hidden), d)            // w1, w2, w3
	add(d)                                   // rms_final_weight
	add(int64(h.seqLen), int64(h.headDim())) // freq_cis_real and freq_cis_imag, seq_len·hd/2 each
	if !h.shared {
		add(int64(h.vocab), d) // wcls
	}
	if over {
		return llama2cHeader{}, bad("header (dim %d, hidden_dim %d, n_layers %d, vocab %d, seq_len %d) implies more than %d weights: absurd",
			h.dim, h.hidden, h.layers, h.vocab, h.seqLen, int64(llama2cMaxFloats))
	}
	h.floats = n
	return h, nil
}

// config returns the engine configuration of a llama2.c model.
func (h llama2cHeader) config() Config {
	return Config{
		Arch: "llama2c", Dim: h.dim, FFN: h.hidden, Layers: h.layers, Heads: h.heads, KVHeads: h.kvHeads,
		HeadDim: h.headDim(), Vocab: h.vocab, MaxSeq: h.seqLen, NormEps: 1e-5, RopeTheta: 10000,
		TiedHead: h.shared, BOS: 1, EOS: 2,
	}
}

// OpenLlama2c loads a legacy (version 0) llama2.c checkpoint (Karpathy's run.c format: a
// header of seven little-endian int32 — dim, hidden_dim, n_layers, n_heads, n_kv_heads,
// vocab_size (negative: separate classifier), seq_len — then the fp32 weights). The file's
// size must match the header exactly. It returns the configuration (Arch "llama2c") and
// the tensors under Hugging Face names, wq and wk converted to the rotate-half rotary layout
// (see permuteRopeRows); lm_head.weight is present only for an unshared classifier. The
// whole file is read into memory. Errors about the content wrap ErrLlama2c and name the path.
func OpenLlama2c(path string) (Config, *MapSource, error) {
	f, err := os.Open(path)
	if err != nil {
		return Config{}, nil, fmt.Errorf("model: open llama2.c checkpoint: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return Config{}, nil, fmt.Errorf("model: open llama2.c checkpoint: %w", err)
	}
	if st.IsDir() {
		return Config{}, nil, fmt.Errorf("%w: %s: is a directory", ErrLlama2c, path)
	}
	head := make([]byte, llama2cHeaderBytes)
	n, err := io.ReadFull(f, head)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return Config{}, nil, fmt.Errorf("model: read llama2.c checkpoint %s: %w", path, err)
	}
	h, err := parseLlama2cHeader(path, head[:n])
	if err != nil {
		return Config{}, nil, err
	}
	// Check the size before reading, so that a wrong file is not read whole.
	if st.Size() != h.fileSize() {
		return Config{}, nil, llama2cSizeError(path, h, st.Size())
	}
	b := make([]byte, h.fileSize())
	if _, err := f.ReadAt(b, 0); err != nil {
		if errors.Is(err, io.EOF) {
			return Config{}, nil, fmt.Errorf("%w: %s: file shrank while reading: %w", ErrLlama2c, path, io.ErrUnexpectedEOF)
		}
		return Config{}, nil, fmt.Errorf("model: read llama2.c checkpoint %s: %w", path, err)
	}
	return decodeLlama2c(path, b)
}

func llama2cSizeError(path string, h llama2cHeader, got int64) error {
	return fmt.Errorf("%w: %s: file is %d bytes, expected exactly %d for dim %d, hidden_dim %d, n_layers %d, n_heads %d, n_kv_heads %d, vocab %d (shared classifier %t), seq_len %d",
		ErrLlama2c, path, got, h.fileSize(), h.dim, h.hidden, h.layers, h.heads, h.kvHeads, h.vocab, h.shared, h.seqLen)
}

// decodeLlama2c decodes a whole checkpoint image b; path only labels errors.
func decodeLlama2c(path string, b []byte) (Config, *MapSource, error) {
	h, err := parseLlama2cHeader(path, b)
	if err != nil {
		return Config{}, nil, err
	}
	if int64(len(b)) != h.fileSize() {
		return Config{}, nil, llama2cSizeError(path, h, int64(len(b)))
	}
	cfg := h.config()
	if err := cfg.Validate(); err != nil {
		return Config{}, nil, fmt.Errorf("%w: %s: %w", ErrLlama2c, path, err)
	}
	all := make([]float32, h.floats)
	for i := range all {
		all[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[llama2cHeaderBytes+4*i:]))
	}
	take := func(n int) []float32 {
		t := all[:n:n]
		all = all[n:]
		return t
	}
	d, hd, L, ffn := h.dim, h.headDim(), h.layers, h.hidden
	kv := h.kvHeads * hd
	src := &MapSource{tensors: make(map[string]memTensor, 9*L+3)}
	src.put("model.embed_tokens.weight", take(h.vocab*d), h.vocab, d)
	perLayer := func(name string, data []float32, shape ...int) {
		n := len(data) / L
		for l := range L {
			src.put(fmt.Sprintf("model.layers.%d.%s", l, name), data[l*n:(l+1)*n:(l+1)*n], shape...)
		}
	}
	perLayer("input_layernorm.weight", take(L*d), d)
	wq, wk := take(L*d*d), take(L*kv*d)
	for l := range L {
		src.put(fmt.Sprintf("model.layers.%d.self_attn.q_proj.weight", l), permuteRopeRows(wq[l*d*d:(l+1)*d*d], h.heads, hd, d), d, d)
		src.put(fmt.Sprintf("model.layers.%d.self_attn.k_proj.weight", l), permuteRopeRows(wk[l*kv*d:(l+1)*kv*d], h.kvHeads, hd, d), kv, d)
	}
	perLayer("self_attn.v_proj.weight", take(L*kv*d), kv, d)
	perLayer("self_attn.o_proj.weight", take(L*d*d), d, d)
	perLayer("post_attention_layernorm.weight", take(L*d), d)
	perLayer("mlp.gate_proj.weight", take(L*ffn*d), ffn, d) // w1
	perLayer("mlp.down_proj.weight", take(L*d*ffn), d, ffn) // w2
	perLayer("mlp.up_proj.weight", take(L*ffn*d), ffn, d)   // w3
	src.put("model.norm.weight", take(d), d)
	take(h.seqLen * hd) // freq_cis_real, freq_cis_imag: recomputed by the engine
	if !h.shared {
		src.put("lm_head.weight", take(h.vocab*d), h.vocab, d)
	}
	return cfg, src, nil
}

// permuteRopeRows returns a copy of w, a [heads·hd, cols] projection (wq or wk), whose
// output rows are reordered within each head from llama2.c's rotary layout to Hugging
// Face's: llama2.c rotates interleaved pairs (2j, 2j+1) of a head by the angle pos·θ^(−2j/hd),
// while the engine's rotate-half rotates pairs (j, j+hd/2) by the same angle. Row 2j of a
// head moves to row j and row 2j+1 to row j+hd/2 (the inverse of the permutation in HF's
// convert_llama_weights_to_hf.py).
//
// The conversion is exact: with P that permutation, rotate-half(P·q) = P·interleaved(q)
// element for element (the same float operations on the same values, only stored in other
// coordinates), and since q and k get the same P within every head (query and key heads
// share hd), each attention score (P·q)·(P·k) = q·k up to summation order. Values, wo and
// everything else are untouched, and the rows are copied, not recomputed.
func permuteRopeRows(w []float32, heads, hd, cols int) []float32 {
	out := make([]float32, len(w))
	half := hd / 2
	for h := range heads {
		base := h * hd
		for j := range half {
			copy(out[(base+j)*cols:(base+j+1)*cols], w[(base+2*j)*cols:(base+2*j+1)*cols])
			copy(out[(base+j+half)*cols:(base+j+half+1)*cols], w[(base+2*j+1)*cols:(base+2*j+2)*cols])
		}
	}
	return out
}
