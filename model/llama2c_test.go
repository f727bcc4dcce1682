package model

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// l2cDims are the seven header fields of a llama2.c checkpoint, in file order.
type l2cDims struct{ dim, hidden, layers, heads, kv, vocab, seq int32 }

func (d l2cDims) header() []byte {
	b := make([]byte, 0, 28)
	for _, v := range []int32{d.dim, d.hidden, d.layers, d.heads, d.kv, d.vocab, d.seq} {
		b = binary.LittleEndian.AppendUint32(b, uint32(v))
	}
	return b
}

// l2cSegment is one weight array of the file, as the test lays it out (independently of
// the loader): its name in run.c and its length in floats.
type l2cSegment struct {
	name string
	n    int
}

func (d l2cDims) layout() []l2cSegment {
	dim, hid, L, hd := int(d.dim), int(d.hidden), int(d.layers), int(d.dim/d.heads)
	kvDim := int(d.dim * d.kv / d.heads)
	vocab := int(d.vocab)
	if vocab < 0 {
		vocab = -vocab
	}
	segs := []l2cSegment{
		{"token_embedding_table", vocab * dim},
		{"rms_att_weight", L * dim},
		{"wq", L * dim * dim},
		{"wk", L * kvDim * dim},
		{"wv", L * kvDim * dim},
		{"wo", L * dim * dim},
		{"rms_ffn_weight", L * dim},
		{"w1", L * hid * dim},
		{"w2", L * dim * hid},
		{"w3", L * hid * dim},
		{"rms_final_weight", dim},
		{"freq_cis_real", int(d.seq) * hd / 2},
		{"freq_cis_imag", int(d.seq) * hd / 2},
	}
	if d.vocab < 0 {
		segs = append(segs, l2cSegment{"wcls", vocab * dim})
	}
	return segs
}

// image returns a whole checkpoint whose weights come from value(i), i the float's index,
// and the offset (in floats) of each segment.
func (d l2cDims) image(value func(i int) float32) ([]byte, map[string]int) {
	b := d.header()
	off := map[string]int{}
	i := 0
	for _, s := range d.layout() {
		off[s.name] = i
		for range s.n {
			b = binary.LittleEndian.AppendUint32(b, math.Float32bits(value(i)))
			i++
		}
	}
	return b, off
}

var l2cTiny = l2cDims{dim: 8, hidden: 12, layers: 2, heads: 2, kv: 1, vocab: 10, seq: 4}

func TestLlama2cHeader(t *testing.T) {
	cases := []struct {
		name string
		b    []byte
		want string // "" for a valid header, else a substring of the message
	}{
		{"shared", l2cTiny.header(), ""},
		{"unshared", l2cDims{8, 12, 2, 2, 1, -10, 4}.header(), ""},
		{"stories260K", l2cDims{64, 172, 5, 8, 4, 512, 512}.header(), ""},
		{"short", l2cTiny.header()[:27], "shorter than the 28-byte header"},
		{"empty", nil, "shorter than the 28-byte header"},
		{"magic", append(binary.LittleEndian.AppendUint32(nil, 0x616b3432), l2cTiny.header()[4:]...), "version-1/2"},
		{"zero dim", l2cDims{0, 12, 2, 2, 1, 10, 4}.header(), "dim = 0"},
		{"negative hidden", l2cDims{8, -12, 2, 2, 1, 10, 4}.header(), "hidden_dim = -12"},
		{"zero layers", l2cDims{8, 12, 0, 2, 1, 10, 4}.header(), "n_layers = 0"},
		{"zero heads", l2cDims{8, 12, 2, 0, 1, 10, 4}.header(), "n_heads = 0"},
		{"zero kv heads", l2cDims{8, 12, 2, 2, 0, 10, 4}.header(), "n_kv_heads = 0"},
		{"zero vocab", l2cDims{8, 12, 2, 2, 1, 0, 4}.header(), "vocab_size = 0"},
		{"negative seq", l2cDims{8, 12, 2, 2, 1, 10, -4}.header(), "seq_len = -4"},
		{"heads do not divide dim", l2cDims{10, 12, 2, 3, 1, 10, 4}.header(), "does not divide dim"},
		{"kv does not divide heads", l2cDims{24, 12, 2, 4, 3, 10, 4}.header(), "does not divide n_heads"},
		{"kv above heads", l2cDims{8, 12, 2, 2, 4, 10, 4}.header(), "does not divide n_heads"},
		{"odd head size", l2cDims{6, 12, 2, 2, 1, 10, 4}.header(), "must be even"},
		{"absurd", l2cDims{1 << 30, 1 << 30, 1 << 30, 1 << 10, 1 << 10, math.MinInt32, math.MaxInt32}.header(), "absurd"},
		{"absurd vocab", l2cDims{1 << 16, 1, 1, 2, 1, math.MinInt32, 2}.header(), "absurd"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h, err := parseLlama2cHeader("some/dir/x.bin", c.b)
			if c.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				var f [7]int32
				binary.Read(bytes.NewReader(c.b), binary.LittleEndian, &f)
				d := l2cDims{f[0], f[1], f[2], f[3], f[4], f[5], f[6]}
				n := 0
				for _, s := range d.layout() {
					n += s.n
				}
				if h.fileSize() != int64(28+4*n) {
					t.Errorf("fileSize() = %d, want %d", h.fileSize(), 28+4*n)
				}
				if err := h.config().Validate(); err != nil {
					t.Error(err)
				}
				return
			}
			if err == nil {
				t.Fatalf("no error, want one mentioning %q", c.want)
			}
			if !errors.Is(err, ErrLlama2c) || !strings.Contains(err.Error(), "some/dir/x.bin") || !strings.Contains(err.Error(), c.want) {
				t.Errorf("err = %q, want ErrLlama2c naming the path and %q", err, c.want)
			}
		})
	}
}

func TestLlama2cFileSize(t *testing.T) {
	dir := t.TempDir()
	img, _ := l2cTiny.image(func(i int) float32 { return float32(i) })
	for _, c := range []struct {
		name string
		b    []byte
	}{
		{"one byte short", img[:len(img)-1]},
		{"one float long", append(slices.Clone(img), 0, 0, 0, 0)},
		{"header only", img[:28]},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(c.name, " ", "_")+".bin")
			if err := os.WriteFile(path, c.b, 0o644); err != nil {
				t.Fatal(err)
			}
			_, _, err := OpenLlama2c(path)
			if !errors.Is(err, ErrLlama2c) {
				t.Fatalf("err = %v, want ErrLlama2c", err)
			}
			msg := err.Error()
			for _, w := range []string{path, strconv.Itoa(len(c.b)), strconv.Itoa(len(img))} {
				if !strings.Contains(msg, w) {
					t.Errorf("err = %q, want it to mention %q (path, actual and expected bytes)", msg, w)
				}
			}
		})
	}
	if _, _, err := OpenLlama2c(filepath.Join(dir, "missing.bin")); err == nil || errors.Is(err, ErrLlama2c) {
		t.Errorf("missing file: %v, want a plain I/O error", err)
	}
	if _, _, err := OpenLlama2c(dir); !errors.Is(err, ErrLlama2c) {
		t.Errorf("directory: %v, want ErrLlama2c", err)
	}
}

// l2cRopeRow maps a row of a head in the loaded (rotate-half) layout to the llama2.c row.
func l2cRopeRow(r, hd int) int {
	if r < hd/2 {
		return 2 * r
	}
	return 2*(r-hd/2) + 1
}

func TestLlama2cPlacement(t *testing.T) {
	for _, d := range []l2cDims{l2cTiny, {8, 12, 2, 2, 1, -10, 4}, {12, 6, 3, 3, 3, -5, 2}} {
		t.Run(fmt.Sprintf("vocab%d", d.vocab), func(t *testing.T) {
			img, off := d.image(func(i int) float32 { return float32(i) })
			path := filepath.Join(t.TempDir(), "tiny.bin")
			if err := os.WriteFile(path, img, 0o644); err != nil {
				t.Fatal(err)
			}
			cfg, src, err := OpenLlama2c(path)
			if err != nil {
				t.Fatal(err)
			}
			defer src.Close()
			dim, hid, L, hd := int(d.dim), int(d.hidden), int(d.layers), int(d.dim/d.heads)
			vocab, kv := int(d.vocab), int(d.kv)*hd
			if vocab < 0 {
				vocab = -vocab
			}
			if cfg.Arch != "llama2c" || cfg.Dim != dim || cfg.FFN != hid || cfg.Layers != L || cfg.Heads != int(d.heads) ||
				cfg.KVHeads != int(d.kv) || cfg.HeadDim != hd || cfg.Vocab != vocab || cfg.MaxSeq != int(d.seq) ||
				cfg.TiedHead != (d.vocab > 0) || cfg.BOS != 1 || cfg.EOS != 2 || cfg.NormEps != 1e-5 || cfg.RopeTheta != 10000 {
				t.Errorf("config = %+v", cfg)
			}
			// check verifies tensor name: element (r, c) must be float #base + src(r)*cols + c.
			check := func(name string, base, rows, cols int, srcRow func(r int) int) {
				t.Helper()
				data, shape, err := src.ReadTensor(name)
				if err != nil {
					t.Fatal(err)
				}
				want := []int{rows, cols}
				if rows == 1 {
					want = []int{cols}
				}
				if !slices.Equal(shape, want) {
					t.Fatalf("%s: shape %v, want %v", name, shape, want)
				}
				for r := range rows {
					for c := range cols {
						if got, w := data[r*cols+c], float32(base+srcRow(r)*cols+c); got != w {
							t.Fatalf("%s[%d,%d] = %v, want %v", name, r, c, got, w)
						}
					}
				}
			}
			same := func(r int) int { return r }
			headPerm := func(r int) int { return r/hd*hd + l2cRopeRow(r%hd, hd) }
			check("model.embed_tokens.weight", off["token_embedding_table"], vocab, dim, same)
			for l := range L {
				p := fmt.Sprintf("model.layers.%d.", l)
				check(p+"input_layernorm.weight", off["rms_att_weight"]+l*dim, 1, dim, same)
				check(p+"self_attn.q_proj.weight", off["wq"]+l*dim*dim, dim, dim, headPerm)
				check(p+"self_attn.k_proj.weight", off["wk"]+l*kv*dim, kv, dim, headPerm)
				check(p+"self_attn.v_proj.weight", off["wv"]+l*kv*dim, kv, dim, same)
				check(p+"self_attn.o_proj.weight", off["wo"]+l*dim*dim, dim, dim, same)
				check(p+"post_attention_layernorm.weight", off["rms_ffn_weight"]+l*dim, 1, dim, same)
				check(p+"mlp.gate_proj.weight", off["w1"]+l*hid*dim, hid, dim, same)
				check(p+"mlp.down_proj.weight", off["w2"]+l*dim*hid, dim, hid, same)
				check(p+"mlp.up_proj.weight", off["w3"]+l*hid*dim, hid, dim, same)
			}
			check("model.norm.weight", off["rms_final_weight"], 1, dim, same)
			names := 2 + 9*L
			if d.vocab < 0 {
				check("lm_head.weight", off["wcls"], vocab, dim, same)
				names++
			} else if _, ok := src.Shape("lm_head.weight"); ok {
				t.Error("lm_head.weight present for a shared classifier")
			}
			if got := len(src.Names()); got != names {
				t.Errorf("%d tensors, want %d: %v", got, names, src.Names())
			}
		})
	}
}

// l2cRopeInterleaved rotates pairs (2j, 2j+1) of every head of x in place, as llama2.c's run.c.
func l2cRopeInterleaved(x []float32, hd, pos int) {
	for i := 0; i < len(x); i += 2 {
		j := (i % hd) / 2
		c, s := l2cCosSin(j, hd, pos)
		v0, v1 := x[i], x[i+1]
		x[i] = v0*c - v1*s
		x[i+1] = v0*s + v1*c
	}
}

// l2cRopeRotateHalf rotates pairs (j, j+hd/2) of every head of x in place, as Hugging Face.
func l2cRopeRotateHalf(x []float32, hd, pos int) {
	half := hd / 2
	for h := 0; h < len(x); h += hd {
		for j := range half {
			c, s := l2cCosSin(j, hd, pos)
			v0, v1 := x[h+j], x[h+j+half]
			x[h+j] = v0*c - v1*s
			x[h+j+half] = v0*s + v1*c
		}
	}
}

func l2cCosSin(j, hd, pos int) (float32, float32) {
	a := float64(pos) / math.Pow(10000, float64(2*j)/float64(hd))
	return float32(math.Cos(a)), float32(math.Sin(a))
}

func l2cMatVec(w []float32, rows, cols int, x []float32) []float32 {
	y := make([]float32, rows)
	for r := range rows {
		var s float32
		for c := range cols {
			s += w[r*cols+c] * x[c]
		}
		y[r] = s
	}
	return y
}

// The permuted wq/wk with rotate-half RoPE give the llama2.c rotated q and k, permuted, and
// the same attention scores.
func TestLlama2cRopePermutation(t *testing.T) {
	d := l2cDims{dim: 32, hidden: 20, layers: 1, heads: 4, kv: 2, vocab: 7, seq: 16}
	rng := rand.New(rand.NewPCG(5, 6))
	img, off := d.image(func(int) float32 { return float32(rng.NormFloat64()) })
	_, src, err := decodeLlama2c("mem.bin", img)
	if err != nil {
		t.Fatal(err)
	}
	dim, hd, kvDim := 32, 8, 16
	raw := func(seg string, n int) []float32 {
		out := make([]float32, n)
		for i := range out {
			out[i] = math.Float32frombits(binary.LittleEndian.Uint32(img[28+4*(off[seg]+i):]))
		}
		return out
	}
	wq, wk := raw("wq", dim*dim), raw("wk", kvDim*dim)
	pq, _, _ := src.ReadTensor("model.layers.0.self_attn.q_proj.weight")
	pk, _, _ := src.ReadTensor("model.layers.0.self_attn.k_proj.weight")
	for trial := range 20 {
		x, y := stRandFloats(rng, dim), stRandFloats(rng, dim)
		pos := rng.IntN(int(d.seq))
		q, k := l2cMatVec(wq, dim, dim, x), l2cMatVec(wk, kvDim, dim, y)
		l2cRopeInterleaved(q, hd, pos)
		l2cRopeInterleaved(k, hd, pos+trial%3)
		q2, k2 := l2cMatVec(pq, dim, dim, x), l2cMatVec(pk, kvDim, dim, y)
		l2cRopeRotateHalf(q2, hd, pos)
		l2cRopeRotateHalf(k2, hd, pos+trial%3)
		for i := range q2 {
			if want := q[i/hd*hd+l2cRopeRow(i%hd, hd)]; q2[i] != want {
				t.Fatalf("trial %d: rotated q'[%d] = %v, want %v (bit-exact)", trial, i, q2[i], want)
			}
		}
		for i := range k2 {
			if want := k[i/hd*hd+l2cRopeRow(i%hd, hd)]; k2[i] != want {
				t.Fatalf("trial %d: rotated k'[%d] = %v, want %v (bit-exact)", trial, i, k2[i], want)
			}
		}
		for h := range int(d.heads) {
			g := h / int(d.heads/d.kv)
			var s1, s2 float64
			for j := range hd {
				s1 += float64(q[h*hd+j]) * float64(k[g*hd+j])
				s2 += float64(q2[h*hd+j]) * float64(k2[g*hd+j])
			}
			if math.Abs(s1-s2) > 1e-9*(1+math.Abs(s1)) {
				t.Fatalf("trial %d head %d: score %v after conversion, %v in llama2.c", trial, h, s2, s1)
			}
		}
	}
}

func TestLlama2cRealModel(t *testing.T) {
	path := filepath.Join("..", "..", "shared", "models", "stories260K", "stories260K.bin")
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("shared model missing: %v", err)
	}
	cfg, src, err := OpenLlama2c(path)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if cfg.Arch != "llama2c" || cfg.Dim != 64 || cfg.FFN != 172 || cfg.Layers != 5 || cfg.Heads != 8 || cfg.KVHeads != 4 ||
		cfg.HeadDim != 8 || cfg.Vocab != 512 || cfg.MaxSeq != 512 || !cfg.TiedHead || cfg.NormEps != 1e-5 ||
		cfg.RopeTheta != 10000 || cfg.BOS != 1 || cfg.EOS != 2 || cfg.Scaling != nil || cfg.QKVBias {
		t.Errorf("config = %+v", cfg)
	}
	if err := cfg.Validate(); err != nil {
		t.Error(err)
	}
	names := src.Names()
	if len(names) != 2+9*5 || slices.Contains(names, "lm_head.weight") {
		t.Errorf("%d tensors (%v), want 47 without lm_head.weight", len(names), names)
	}
	shapes := map[string][]int{
		"model.embed_tokens.weight":              {512, 64},
		"model.layers.4.self_attn.k_proj.weight": {32, 64},
		"model.layers.0.mlp.gate_proj.weight":    {172, 64},
		"model.layers.2.mlp.down_proj.weight":    {64, 172},
		"model.norm.weight":                      {64},
	}
	for n, want := range shapes {
		if got, ok := src.Shape(n); !ok || !slices.Equal(got, want) {
			t.Errorf("%s: shape %v, want %v", n, got, want)
		}
	}
	for _, n := range names {
		data, _, err := src.ReadTensor(n)
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range data {
			if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
				t.Fatalf("%s holds %v", n, v)
			}
		}
	}
	// The final RMSNorm weight is the last array before the RoPE tables.
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	norm, _, _ := src.ReadTensor("model.norm.weight")
	start := len(b) - 4*(512*8) - 4*64
	for i, v := range norm {
		if w := math.Float32frombits(binary.LittleEndian.Uint32(b[start+4*i:])); v != w {
			t.Fatalf("norm[%d] = %v, file holds %v", i, v, w)
		}
	}
}

func FuzzLlama2cHeader(f *testing.F) {
	rng := rand.New(rand.NewPCG(7, 8))
	for _, d := range []l2cDims{l2cTiny, {4, 2, 1, 2, 1, -3, 1}} {
		img, _ := d.image(func(int) float32 { return float32(rng.NormFloat64()) })
		f.Add(img)
	}
	f.Add(l2cDims{64, 172, 5, 8, 4, 512, 512}.header())
	f.Add(l2cDims{1 << 30, 1 << 30, 1 << 30, 1 << 10, 1 << 10, math.MinInt32, math.MaxInt32}.header())
	f.Add(binary.LittleEndian.AppendUint32(nil, 0x616b3432))
	f.Fuzz(func(t *testing.T, b []byte) {
		cfg, src, err := decodeLlama2c("fuzz.bin", b)
		if err != nil {
			if !errors.Is(err, ErrLlama2c) {
				t.Fatalf("error does not wrap ErrLlama2c: %v", err)
			}
			return
		}
		if err := cfg.Validate(); err != nil {
			t.Fatal(err)
		}
		if _, ok := src.Shape("model.embed_tokens.weight"); !ok {
			t.Fatal("no embeddings")
		}
		for _, n := range src.Names() {
			data, shape, err := src.ReadTensor(n)
			if err != nil {
				t.Fatal(err)
			}
			p := 1
			for _, s := range shape {
				p *= s
			}
			if p != len(data) {
				t.Fatalf("%s: %d values for shape %v", n, len(data), shape)
			}
		}
	})
}
