package model

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"unicode/utf8"
)

// Hugging Face tokenizer files read by LoadHFTokenizer.
const (
	hfTokenizerFile       = "tokenizer.json"
	hfTokenizerConfigFile = "tokenizer_config.json"
	hfModelConfigFile     = "config.json"
)

// HFTokenizer is a Hugging Face tokenizer.json with a BPE model: byte-level BPE (GPT-2,
// LLaMA-3, Qwen2/Qwen3: a Split regex and ByteLevel pre-tokenizer) or SentencePiece-style BPE
// (LLaMA-2, Mistral: Prepend/Replace normalizers or a Metaspace pre-tokenizer, byte fallback
// <0xXX>, fuse_unk). Added tokens are matched in the text first, as transformers does by
// default (tokenizer(text) with split_special_tokens=False), honouring their lstrip, rstrip,
// single_word and normalized flags. It is safe for concurrent use (its only mutable state
// is a cache of the ids of short words).
type HFTokenizer struct {
	pieces []string       // by id: the model's vocabulary and the added tokens ("" where none)
	vocab  map[string]int // the BPE model's vocabulary (added tokens excluded)
	merges map[uint64]bpeMerge

	norm    hfNormalizer // nil: none
	pre     []hfPreTokenizer
	added   hfAddedTokens
	special []bool // by id: a special added token (decodes to nothing)

	byteLevel    bool // the pre-tokenizer maps bytes to the GPT-2 unicode alphabet
	byteFallback bool
	byteID       [256]int // id of <0xXX>, -1 when missing
	fuseUnk      bool
	ignoreMerges bool
	unk          int // -1: none

	cache *hfWordCache

	// cross holds the rune pairs (last rune of a, first rune of b) of the merges (a, b):
	// no merge joins two runes not in it, so a long word is encoded in chunks cut between
	// such runes (nil: never cut, when a merge involves a byte-fallback piece).
	cross      map[uint64]struct{}
	chunkBytes int // the least size of the chunks of a word longer than hfCacheWordLen

	prefix   []int // ids the post-processor puts before the text
	docStart int
	bos, eos int
	decoder  hfDecoderKind
}

var _ Tokenizer = (*HFTokenizer)(nil)

// hfFile mirrors the parts of tokenizer.json that encoding uses. Parts are kept raw and
// interpreted by the builders, which refuse what they do not know, naming the part.
type hfFile struct {
	AddedTokens   []hfAddedToken  `json:"added_tokens"`
	Normalizer    json.RawMessage `json:"normalizer"`
	PreTokenizer  json.RawMessage `json:"pre_tokenizer"`
	Model         json.RawMessage `json:"model"`
	PostProcessor json.RawMessage `json:"post_processor"`
	Decoder       json.RawMessage `json:"decoder"`
}

type hfAddedToken struct {
	ID         int    `json:"id"`
	Content    string `json:"content"`
	SingleWord bool   `json:"single_word"`
	LStrip     bool   `json:"lstrip"`
	RStrip     bool   `json:"rstrip"`
	Normalized bool   `json:"normalized"`
	Special    bool   `json:"special"`
}

type hfBPEModel struct {
	Type                    string          `json:"type"`
	Vocab                   map[string]int  `json:"vocab"`
	Merges                  json.RawMessage `json:"merges"`
	UnkToken                *string         `json:"unk_token"`
	ContinuingSubwordPrefix *string         `json:"continuing_subword_prefix"`
	EndOfWordSuffix         *string         `json:"end_of_word_suffix"`
	Dropout                 *float64        `json:"dropout"`
	FuseUnk                 bool            `json:"fuse_unk"`
	ByteFallback            bool            `json:"byte_fallback"`
	IgnoreMerges            bool            `json:"ignore_merges"`
}

// hfMaxID bounds the ids a tokenizer.json may use, so that a corrupt file cannot make the
// loader allocate without limit.
const hfMaxID = 1 << 24

// LoadHFTokenizer reads dir/tokenizer.json with dir/tokenizer_config.json (optional: the
// names of the bos and eos tokens) and dir/config.json (optional: bos_token_id, the document
// start when the post-processor adds no BOS). Errors wrap ErrTokenizer and name the file and
// the part that is malformed or unsupported: a model other than BPE (WordPiece, Unigram,
// WordLevel), BPE dropout or subword affixes, an unknown normalizer, pre-tokenizer or
// post-processor, a post-processor adding tokens after the text, or a tokenizer that adds no
// BOS in a model whose config.json has no bos_token_id. The decoder is only used by Decode
// and never refused.
func LoadHFTokenizer(dir string) (*HFTokenizer, error) {
	path := filepath.Join(dir, hfTokenizerFile)
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("model: load tokenizer: %w", err)
	}
	var cfg, modelCfg []byte
	if cfg, err = os.ReadFile(filepath.Join(dir, hfTokenizerConfigFile)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("model: load tokenizer: %w", err)
	}
	if modelCfg, err = os.ReadFile(filepath.Join(dir, hfModelConfigFile)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("model: load tokenizer: %w", err)
	}
	t, err := ParseHFTokenizer(b, cfg, modelCfg)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return t, nil
}

// ParseHFTokenizer builds a tokenizer from the bytes of tokenizer.json, tokenizer_config.json
// and config.json (either of the last two may be nil: absent). Errors are LoadHFTokenizer's.
func ParseHFTokenizer(tokenizerJSON, tokenizerConfig, modelConfig []byte) (*HFTokenizer, error) {
	var f hfFile
	if err := json.Unmarshal(tokenizerJSON, &f); err != nil {
		return nil, fmt.Errorf("%w: tokenizer.json: %v", ErrTokenizer, err)
	}
	t := &HFTokenizer{unk: -1, bos: -1, eos: -1, docStart: -1, cache: new(hfWordCache)}
	if err := t.buildModel(f.Model); err != nil {
		return nil, err
	}
	if err := t.buildAdded(f.AddedTokens); err != nil {
		return nil, err
	}
	var err error
	if t.norm, err = parseHFNormalizer(f.Normalizer); err != nil {
		return nil, err
	}
	if t.pre, err = parseHFPreTokenizer(f.PreTokenizer); err != nil {
		return nil, err
	}
	for _, p := range t.pre {
		if _, ok := p.(hfByteLevelPre); ok {
			t.byteLevel = true
		}
	}
	if err := t.added.compile(t.norm); err != nil {
		return nil, err
	}
	if t.prefix, err = t.parsePostProcessor(f.PostProcessor); err != nil {
		return nil, err
	}
	t.decoder = parseHFDecoder(f.Decoder)
	if err := t.readTokenizerConfig(tokenizerConfig); err != nil {
		return nil, err
	}
	if err := t.setDocStart(modelConfig); err != nil {
		return nil, err
	}
	return t, nil
}

func (t *HFTokenizer) buildModel(raw json.RawMessage) error {
	if isJSONNull(raw) {
		return fmt.Errorf("%w: tokenizer.json has no model", ErrTokenizer)
	}
	var m hfBPEModel
	if err := json.Unmarshal(raw, &m); err != nil {
		return fmt.Errorf("%w: model: %v", ErrTokenizer, err)
	}
	switch m.Type {
	case "BPE":
	case "":
		return fmt.Errorf("%w: model has no type (only BPE is supported)", ErrTokenizer)
	default:
		return fmt.Errorf("%w: model type %q unsupported (only BPE)", ErrTokenizer, m.Type)
	}
	switch {
	case m.Dropout != nil && *m.Dropout != 0:
		return fmt.Errorf("%w: model: BPE dropout %v unsupported (encoding would be random)", ErrTokenizer, *m.Dropout)
	case m.ContinuingSubwordPrefix != nil && *m.ContinuingSubwordPrefix != "":
		return fmt.Errorf("%w: model: BPE continuing_subword_prefix %q unsupported", ErrTokenizer, *m.ContinuingSubwordPrefix)
	case m.EndOfWordSuffix != nil && *m.EndOfWordSuffix != "":
		return fmt.Errorf("%w: model: BPE end_of_word_suffix %q unsupported", ErrTokenizer, *m.EndOfWordSuffix)
	case len(m.Vocab) == 0:
		return fmt.Errorf("%w: model: empty vocabulary", ErrTokenizer)
	}
	t.vocab = m.Vocab
	n := 0
	for piece, id := range m.Vocab {
		if id < 0 || id >= hfMaxID {
			return fmt.Errorf("%w: model: vocabulary id %d of %q out of range", ErrTokenizer, id, piece)
		}
		n = max(n, id+1)
	}
	t.pieces = make([]string, n)
	for piece, id := range m.Vocab {
		t.pieces[id] = piece
	}
	pairs, err := parseHFMerges(m.Merges)
	if err != nil {
		return err
	}
	t.merges = make(map[uint64]bpeMerge, len(pairs))
	t.cross = map[uint64]struct{}{}
	t.chunkBytes = hfChunkBytes
	for rank, p := range pairs {
		if t.cross != nil {
			if isBytePiece(p[0]) || isBytePiece(p[1]) {
				t.cross = nil
			} else {
				r1, _ := utf8.DecodeLastRuneInString(p[0])
				r2, _ := utf8.DecodeRuneInString(p[1])
				t.cross[runePair(r1, r2)] = struct{}{}
			}
		}
		a, okA := m.Vocab[p[0]]
		b, okB := m.Vocab[p[1]]
		c, okC := m.Vocab[p[0]+p[1]]
		if !okA || !okB || !okC {
			return fmt.Errorf("%w: model: merge %d (%q %q) uses a piece not in the vocabulary", ErrTokenizer, rank, p[0], p[1])
		}
		// A pair listed twice keeps its last rank, as in tokenizers and transformers.js
		// (both build a map from the list).
		t.merges[mergeKey(a, b)] = bpeMerge{rank: int32(rank), id: int32(c)}
	}
	t.fuseUnk, t.byteFallback, t.ignoreMerges = m.FuseUnk, m.ByteFallback, m.IgnoreMerges
	if m.UnkToken != nil {
		id, ok := m.Vocab[*m.UnkToken]
		if !ok {
			return fmt.Errorf("%w: model: unk_token %q not in the vocabulary", ErrTokenizer, *m.UnkToken)
		}
		t.unk = id
	}
	for i := range t.byteID {
		t.byteID[i] = -1
		if id, ok := m.Vocab[fmt.Sprintf("<0x%02X>", i)]; ok {
			t.byteID[i] = id
		}
	}
	return nil
}

// parseHFMerges reads merges in either form: "a b" strings (split at the first space, as
// tokenizers < 0.20 wrote them) or ["a", "b"] pairs.
func parseHFMerges(raw json.RawMessage) ([][2]string, error) {
	if isJSONNull(raw) {
		return nil, nil
	}
	var items []json.RawMessage
	if err := json.Unmarshal(raw, &items); err != nil {
		return nil, fmt.Errorf("%w: model: merges: %v", ErrTokenizer, err)
	}
	out := make([][2]string, len(items))
	for i, it := range items {
		var s string
		if json.Unmarshal(it, &s) == nil {
			a, b, ok := strings.Cut(s, " ")
			if !ok || a == "" || b == "" {
				return nil, fmt.Errorf("%w: model: merge %d %q is not two pieces separated by a space", ErrTokenizer, i, s)
			}
			out[i] = [2]string{a, b}
			continue
		}
		var p []string
		if err := json.Unmarshal(it, &p); err != nil || len(p) != 2 || p[0] == "" || p[1] == "" {
			return nil, fmt.Errorf("%w: model: merge %d is neither \"a b\" nor [\"a\", \"b\"]", ErrTokenizer, i)
		}
		out[i] = [2]string{p[0], p[1]}
	}
	return out, nil
}

func (t *HFTokenizer) buildAdded(tokens []hfAddedToken) error {
	for _, a := range tokens {
		if a.ID < 0 || a.ID >= hfMaxID {
			return fmt.Errorf("%w: added_tokens: id %d of %q out of range", ErrTokenizer, a.ID, a.Content)
		}
		if a.Content == "" {
			return fmt.Errorf("%w: added_tokens: id %d has empty content", ErrTokenizer, a.ID)
		}
		if a.ID >= len(t.pieces) {
			t.pieces = append(t.pieces, make([]string, a.ID+1-len(t.pieces))...)
		}
		t.pieces[a.ID] = a.Content
		t.added.tokens = append(t.added.tokens, a)
	}
	t.special = make([]bool, len(t.pieces))
	for _, a := range tokens {
		t.special[a.ID] = a.Special
	}
	return nil
}

// parsePostProcessor returns the ids the post-processor puts before the text of a single
// sequence. ByteLevel adds none; TemplateProcessing adds its special tokens before $A; a
// template with tokens after $A, Bert/Roberta processing (which append [SEP]) and unknown
// kinds are refused.
func (t *HFTokenizer) parsePostProcessor(raw json.RawMessage) ([]int, error) {
	if isJSONNull(raw) {
		return nil, nil
	}
	var head struct {
		Type       string            `json:"type"`
		Processors []json.RawMessage `json:"processors"`
		Single     []struct {
			SpecialToken *struct {
				ID string `json:"id"`
			} `json:"SpecialToken"`
			Sequence *struct {
				ID string `json:"id"`
			} `json:"Sequence"`
		} `json:"single"`
		SpecialTokens map[string]struct {
			IDs []int `json:"ids"`
		} `json:"special_tokens"`
	}
	if err := json.Unmarshal(raw, &head); err != nil {
		return nil, fmt.Errorf("%w: post_processor: %v", ErrTokenizer, err)
	}
	switch head.Type {
	case "ByteLevel":
		return nil, nil
	case "Sequence":
		var prefix []int
		for _, p := range head.Processors {
			ids, err := t.parsePostProcessor(p)
			if err != nil {
				return nil, err
			}
			if len(prefix) > 0 && len(ids) > 0 {
				return nil, fmt.Errorf("%w: post_processor: a Sequence of several templates is unsupported", ErrTokenizer)
			}
			prefix = append(prefix, ids...)
		}
		return prefix, nil
	case "TemplateProcessing":
		var prefix []int
		seen := false
		for _, it := range head.Single {
			switch {
			case it.Sequence != nil:
				if it.Sequence.ID != "A" || seen {
					return nil, fmt.Errorf("%w: post_processor: TemplateProcessing single template must hold $A once", ErrTokenizer)
				}
				seen = true
			case it.SpecialToken != nil:
				if seen {
					return nil, fmt.Errorf("%w: post_processor: TemplateProcessing adds %q after the text; unsupported (the windows protocol puts only a document start before each line)", ErrTokenizer, it.SpecialToken.ID)
				}
				st, ok := head.SpecialTokens[it.SpecialToken.ID]
				if !ok || len(st.IDs) == 0 {
					return nil, fmt.Errorf("%w: post_processor: special token %q has no ids", ErrTokenizer, it.SpecialToken.ID)
				}
				prefix = append(prefix, st.IDs...)
			default:
				return nil, fmt.Errorf("%w: post_processor: TemplateProcessing item is neither SpecialToken nor Sequence", ErrTokenizer)
			}
		}
		if !seen {
			return nil, fmt.Errorf("%w: post_processor: TemplateProcessing single template lacks $A", ErrTokenizer)
		}
		if len(prefix) > 1 {
			return nil, fmt.Errorf("%w: post_processor: TemplateProcessing puts %d tokens before the text; only one (the BOS) is supported", ErrTokenizer, len(prefix))
		}
		for _, id := range prefix {
			if id < 0 || id >= len(t.pieces) {
				return nil, fmt.Errorf("%w: post_processor: special token id %d outside the vocabulary [0,%d)", ErrTokenizer, id, len(t.pieces))
			}
		}
		return prefix, nil
	case "":
		return nil, fmt.Errorf("%w: post_processor has no type", ErrTokenizer)
	default:
		return nil, fmt.Errorf("%w: post_processor %q unsupported (ByteLevel, TemplateProcessing or a Sequence of them)", ErrTokenizer, head.Type)
	}
}

// readTokenizerConfig takes the bos and eos token names of tokenizer_config.json: a string,
// an {"content": ...} object or null; add_eos_token true is refused.
func (t *HFTokenizer) readTokenizerConfig(b []byte) error {
	if b == nil {
		return nil
	}
	var c struct {
		BOS         json.RawMessage `json:"bos_token"`
		EOS         json.RawMessage `json:"eos_token"`
		AddEOSToken bool            `json:"add_eos_token"`
	}
	if err := json.Unmarshal(b, &c); err != nil {
		return fmt.Errorf("%w: tokenizer_config.json: %v", ErrTokenizer, err)
	}
	if c.AddEOSToken {
		// transformers' LlamaTokenizerFast then rebuilds the post-processor to append EOS.
		return fmt.Errorf("%w: tokenizer_config.json: add_eos_token true (EOS after the text) unsupported: the windows protocol puts only a document start before each line", ErrTokenizer)
	}
	var err error
	if t.bos, err = t.namedToken("bos_token", c.BOS); err != nil {
		return err
	}
	t.eos, err = t.namedToken("eos_token", c.EOS)
	return err
}

func (t *HFTokenizer) namedToken(key string, raw json.RawMessage) (int, error) {
	if isJSONNull(raw) {
		return -1, nil
	}
	var name string
	if json.Unmarshal(raw, &name) != nil {
		var obj struct {
			Content string `json:"content"`
		}
		if err := json.Unmarshal(raw, &obj); err != nil {
			return -1, fmt.Errorf("%w: tokenizer_config.json: %s is neither a string nor {\"content\": ...}", ErrTokenizer, key)
		}
		name = obj.Content
	}
	for id, p := range t.pieces {
		if p == name && (t.special[id] || t.vocab[name] == id) {
			return id, nil
		}
	}
	return -1, fmt.Errorf("%w: tokenizer_config.json: %s %q is not a token", ErrTokenizer, key, name)
}

// setDocStart picks the document-start id: the post-processor's BOS, else config.json's
// bos_token_id.
func (t *HFTokenizer) setDocStart(modelConfig []byte) error {
	if len(t.prefix) == 1 {
		t.docStart = t.prefix[0]
		return nil
	}
	if modelConfig == nil {
		return fmt.Errorf("%w: the tokenizer adds no BOS and there is no config.json with a bos_token_id to start documents with", ErrTokenizer)
	}
	var c struct {
		BOS json.RawMessage `json:"bos_token_id"`
	}
	if err := json.Unmarshal(modelConfig, &c); err != nil {
		return fmt.Errorf("%w: config.json: %v", ErrTokenizer, err)
	}
	if isJSONNull(c.BOS) {
		return fmt.Errorf("%w: the tokenizer adds no BOS and config.json has no bos_token_id to start documents with", ErrTokenizer)
	}
	var id int
	if err := json.Unmarshal(c.BOS, &id); err != nil {
		var ids []int
		if json.Unmarshal(c.BOS, &ids) != nil || len(ids) == 0 {
			return fmt.Errorf("%w: config.json: bos_token_id %s is not a token id", ErrTokenizer, c.BOS)
		}
		id = ids[0]
	}
	if id < 0 || id >= len(t.pieces) {
		return fmt.Errorf("%w: config.json: bos_token_id %d outside the tokenizer's vocabulary [0,%d)", ErrTokenizer, id, len(t.pieces))
	}
	t.docStart = id
	return nil
}

func isBytePiece(p string) bool {
	return len(p) == 6 && strings.HasPrefix(p, "<0x") && p[5] == '>'
}

func runePair(a, b rune) uint64 { return uint64(uint32(a))<<32 | uint64(uint32(b)) }

func isJSONNull(raw json.RawMessage) bool {
	s := bytes.TrimSpace(raw)
	return len(s) == 0 || string(s) == "null"
}

// VocabSize is one past the largest id of the vocabulary and the added tokens.
func (t *HFTokenizer) VocabSize() int { return len(t.pieces) }

// BOS is tokenizer_config.json's bos_token, or -1.
func (t *HFTokenizer) BOS() int { return t.bos }

// EOS is tokenizer_config.json's eos_token, or -1.
func (t *HFTokenizer) EOS() int { return t.eos }

// DocumentStart is the id every document starts with: the BOS the post-processor adds (what
// tokenizer(text) puts first in transformers), or config.json's bos_token_id when the
// post-processor adds none (LLaMA-3's early tokenizer.json, Qwen).
func (t *HFTokenizer) DocumentStart() int { return t.docStart }

// Piece returns the text of id as stored in the vocabulary (byte-level pieces in the GPT-2
// alphabet), or "" for an id without one. It panics when id is outside [0, VocabSize()).
func (t *HFTokenizer) Piece(id int) string { return t.pieces[id] }

// Encode returns the ids of text without the post-processor's tokens: added tokens found
// in the text, then for the text between them the normalizer, the pre-tokenizer and BPE.
// Invalid UTF-8 is read as U+FFFD, one per invalid byte.
func (t *HFTokenizer) Encode(text string) []int {
	if !utf8.ValidString(text) {
		text = string([]rune(text))
	}
	var ids []int
	var sc hfScratch
	t.added.split(text, t.norm, func(s string, id int, first bool) {
		if id >= 0 {
			ids = append(ids, id)
			return
		}
		for _, w := range hfPreTokenize(t.pre, s, first) {
			ids = t.encodeWord(ids, w, &sc)
		}
	})
	return ids
}

// Decode returns the text of ids. Special added tokens and ids outside [0, VocabSize())
// decode to nothing; bytes that do not form UTF-8 become U+FFFD.
func (t *HFTokenizer) Decode(ids []int) string {
	var b []byte
	for _, id := range ids {
		if id < 0 || id >= len(t.pieces) || t.special[id] {
			continue
		}
		p := t.pieces[id]
		if _, isModel := t.vocab[p]; !isModel || t.vocab[p] != id {
			b = append(b, p...) // a non-special added token: its content as written
			continue
		}
		switch {
		case t.decoder == hfDecodeByteLevel:
			for _, r := range p {
				if c, ok := byteLevelDecode[r]; ok {
					b = append(b, c)
				} else {
					b = utf8.AppendRune(b, r)
				}
			}
		case t.byteFallback && len(p) == 6 && strings.HasPrefix(p, "<0x") && p[5] == '>':
			var v byte
			if _, err := fmt.Sscanf(p[3:5], "%02X", &v); err == nil {
				b = append(b, v)
			} else {
				b = append(b, p...)
			}
		case t.decoder == hfDecodeMetaspace:
			b = append(b, strings.ReplaceAll(p, spSpace, " ")...)
		default:
			b = append(b, p...)
		}
	}
	s := strings.ToValidUTF8(string(b), "\uFFFD")
	if t.decoder == hfDecodeMetaspace {
		s = strings.TrimPrefix(s, " ")
	}
	return s
}

// TokenizingConfig is what tokenizing needs from a model's configuration.
type TokenizingConfig struct {
	Vocab int // vocab_size: every token id must lie in [0, Vocab)
}

// ReadTokenizingConfig reads what tokenizing needs from the model at path, never the
// weights: config.json's vocab_size for a Hugging Face directory (any model_type: a
// tokenizer directory beside a real model's config.json is enough), the header of a
// llama2.c .bin checkpoint otherwise. Errors wrap ErrConfig for a config without a positive
// vocab_size.
func ReadTokenizingConfig(path string) (TokenizingConfig, error) {
	v, err := readVocabSize(path)
	return TokenizingConfig{Vocab: v}, err
}

func readVocabSize(path string) (int, error) {
	if path == "" {
		return 0, fmt.Errorf("%w: no model path given", ErrConfig)
	}
	st, err := os.Stat(path)
	if err != nil {
		return 0, fmt.Errorf("model: %w", err)
	}
	dir := path
	if !st.IsDir() {
		if strings.EqualFold(filepath.Ext(path), ".bin") {
			cfg, err := ReadModelConfig(path)
			return cfg.Vocab, err
		}
		dir = filepath.Dir(path)
	}
	p := filepath.Join(dir, hfModelConfigFile)
	b, err := os.ReadFile(p)
	if err != nil {
		return 0, fmt.Errorf("model: read config: %w", err)
	}
	var c struct {
		VocabSize int `json:"vocab_size"`
	}
	if err := json.Unmarshal(b, &c); err != nil {
		return 0, fmt.Errorf("%s: %w: malformed JSON: %v", p, ErrConfig, err)
	}
	if c.VocabSize <= 0 {
		return 0, fmt.Errorf("%s: %w: vocab_size must be positive (got %d)", p, ErrConfig, c.VocabSize)
	}
	return c.VocabSize, nil
}
