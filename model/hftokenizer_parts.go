package model

import (
	"encoding/json"
	"fmt"
	"regexp"
	"sort"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/dlclark/regexp2"
	"golang.org/x/text/unicode/norm"
)

// This file holds the parts of a tokenizer.json pipeline: normalizers, pre-tokenizers, the
// added-token matcher and the decoder kind. Each parser refuses a kind it does not know,
// naming it.

// hfNormalizer rewrites a section of text (between added tokens) before pre-tokenization.
type hfNormalizer interface {
	normalize(s string) string
}

type hfNormSeq []hfNormalizer

func (q hfNormSeq) normalize(s string) string {
	for _, n := range q {
		s = n.normalize(s)
	}
	return s
}

type hfUnicodeNorm struct{ form norm.Form }

func (n hfUnicodeNorm) normalize(s string) string { return n.form.String(s) }

type hfPrepend string

// normalize prepends to a non-empty section (tokenizers' Prepend skips an empty one).
func (p hfPrepend) normalize(s string) string {
	if s == "" {
		return s
	}
	return string(p) + s
}

type hfReplace struct {
	literal string          // String pattern
	re      *regexp2.Regexp // Regex pattern (nil for a literal)
	content string
}

func (r hfReplace) normalize(s string) string {
	if r.re == nil {
		return strings.ReplaceAll(s, r.literal, r.content)
	}
	out, err := r.re.Replace(s, r.content, -1, -1)
	if err != nil { // a match timeout, never set here
		return s
	}
	return out
}

type hfLowercase struct{}

func (hfLowercase) normalize(s string) string { return strings.ToLower(s) }

type hfStrip struct{ left, right bool }

func (n hfStrip) normalize(s string) string {
	if n.left {
		s = strings.TrimLeftFunc(s, unicode.IsSpace)
	}
	if n.right {
		s = strings.TrimRightFunc(s, unicode.IsSpace)
	}
	return s
}

// hfPattern is a Split or Replace pattern: {"String": "..."} or {"Regex": "..."}.
type hfPattern struct {
	String *string `json:"String"`
	Regex  *string `json:"Regex"`
}

// hfRegexRewrites are the rewrites transformers.js applies before compiling a pattern: the
// case-insensitive contractions of LLaMA-3 and Qwen become explicit ASCII classes, so that
// "'S" matches but no non-ASCII case variant does.
var hfRegexRewrites = []struct{ from, to string }{
	{"(?i:'s|'t|'re|'ve|'m|'ll|'d)", "(?:'(?:[sS]|[tT]|[rR][eE]|[vV][eE]|[mM]|[lL][lL]|[dD]))"},
}

func compileHFRegex(part, src string) (*regexp2.Regexp, error) {
	for _, rw := range hfRegexRewrites {
		src = strings.ReplaceAll(src, rw.from, rw.to)
	}
	re, err := regexp2.Compile(src, regexp2.None)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: regex %q: %v", ErrTokenizer, part, src, err)
	}
	return re, nil
}

func (p hfPattern) compile(part string) (literal string, re *regexp2.Regexp, err error) {
	switch {
	case p.String != nil && p.Regex == nil:
		if *p.String == "" {
			return "", nil, fmt.Errorf("%w: %s: empty String pattern", ErrTokenizer, part)
		}
		return *p.String, nil, nil
	case p.Regex != nil && p.String == nil:
		re, err := compileHFRegex(part, *p.Regex)
		return "", re, err
	}
	return "", nil, fmt.Errorf("%w: %s: pattern must be {\"String\": ...} or {\"Regex\": ...}", ErrTokenizer, part)
}

// parseHFNormalizer builds tokenizer.json's normalizer; nil when there is none.
func parseHFNormalizer(raw json.RawMessage) (hfNormalizer, error) {
	if isJSONNull(raw) {
		return nil, nil
	}
	var c struct {
		Type        string            `json:"type"`
		Normalizers []json.RawMessage `json:"normalizers"`
		Prepend     *string           `json:"prepend"`
		Pattern     hfPattern         `json:"pattern"`
		Content     *string           `json:"content"`
		Left        bool              `json:"left"`
		Right       bool              `json:"right"`
	}
	if err := json.Unmarshal(raw, &c); err != nil {
		return nil, fmt.Errorf("%w: normalizer: %v", ErrTokenizer, err)
	}
	switch c.Type {
	case "Sequence":
		var seq hfNormSeq
		for _, r := range c.Normalizers {
			n, err := parseHFNormalizer(r)
			if err != nil {
				return nil, err
			}
			if n != nil {
				seq = append(seq, n)
			}
		}
		return seq, nil
	case "NFC":
		return hfUnicodeNorm{norm.NFC}, nil
	case "NFD":
		return hfUnicodeNorm{norm.NFD}, nil
	case "NFKC":
		return hfUnicodeNorm{norm.NFKC}, nil
	case "NFKD":
		return hfUnicodeNorm{norm.NFKD}, nil
	case "Lowercase":
		return hfLowercase{}, nil
	case "Strip":
		return hfStrip{c.Left, c.Right}, nil
	case "Prepend":
		if c.Prepend == nil {
			return nil, fmt.Errorf("%w: normalizer Prepend without prepend", ErrTokenizer)
		}
		return hfPrepend(*c.Prepend), nil
	case "Replace":
		lit, re, err := c.Pattern.compile("normalizer Replace")
		if err != nil {
			return nil, err
		}
		if c.Content == nil {
			return nil, fmt.Errorf("%w: normalizer Replace without content", ErrTokenizer)
		}
		content := *c.Content
		if re != nil { // regexp2 reads $ in a replacement as a group; tokenizers does not
			content = strings.ReplaceAll(content, "$", "$$")
		}
		return hfReplace{literal: lit, re: re, content: content}, nil
	case "":
		return nil, fmt.Errorf("%w: normalizer has no type", ErrTokenizer)
	default:
		return nil, fmt.Errorf("%w: normalizer %q unsupported (Sequence, NFC, NFD, NFKC, NFKD, Lowercase, Strip, Prepend, Replace)", ErrTokenizer, c.Type)
	}
}

// hfPreTokenizer splits a normalized section into words (BPE never merges across words).
// first says the words come from the text's first section (Metaspace's prepend_scheme
// "first" prepends only there).
type hfPreTokenizer interface {
	split(words []string, first bool) []string
}

// hfPreTokenize runs pre-tokenizers over a section.
func hfPreTokenize(pre []hfPreTokenizer, s string, first bool) []string {
	words := []string{s}
	for _, p := range pre {
		words = p.split(words, first)
	}
	return words
}

// hfSplitBehavior is tokenizers' SplitDelimiterBehavior.
type hfSplitBehavior int

const (
	hfRemoved hfSplitBehavior = iota
	hfIsolated
	hfMergedWithPrevious
	hfMergedWithNext
	hfContiguous
)

// hfSplitPre is the Split pre-tokenizer.
type hfSplitPre struct {
	literal  string
	re       *regexp2.Regexp
	fast     *gpt4Split // the hand-written matcher of re, when it has one
	behavior hfSplitBehavior
	invert   bool
}

// matches returns the byte ranges of the non-empty matches of the pattern in s.
func (p hfSplitPre) matches(s string) [][2]int {
	if p.fast != nil {
		return p.fast.matches(s)
	}
	var out [][2]int
	if p.re == nil {
		for i := 0; ; {
			j := strings.Index(s[i:], p.literal)
			if j < 0 {
				return out
			}
			out = append(out, [2]int{i + j, i + j + len(p.literal)})
			i += j + len(p.literal)
		}
	}
	runes := []rune(s)
	// Byte offset of every rune index, to map regexp2's rune positions back.
	off := make([]int, len(runes)+1)
	for i, r := range runes {
		off[i+1] = off[i] + utf8.RuneLen(r)
	}
	m, err := p.re.FindRunesMatch(runes)
	for err == nil && m != nil {
		if m.Length > 0 {
			out = append(out, [2]int{off[m.Index], off[m.Index+m.Length]})
		}
		m, err = p.re.FindNextMatch(m)
	}
	return out
}

func (p hfSplitPre) split(words []string, _ bool) []string {
	var out []string
	for _, w := range words {
		out = splitByMatches(out, w, p.matches(w), p.behavior, p.invert)
	}
	return out
}

// splitByMatches appends the pieces of s cut at the matches, as tokenizers'
// NormalizedString::split does for each behavior (invert swaps matches and the rest).
func splitByMatches(out []string, s string, ms [][2]int, behavior hfSplitBehavior, invert bool) []string {
	type piece struct {
		a, b  int
		match bool
	}
	var ps []piece
	prev := 0
	for _, m := range ms {
		if prev < m[0] {
			ps = append(ps, piece{prev, m[0], invert})
		}
		ps = append(ps, piece{m[0], m[1], !invert})
		prev = m[1]
	}
	if prev < len(s) {
		ps = append(ps, piece{prev, len(s), invert})
	}
	var cur []piece // pieces merged so far (a range)
	flush := func() {
		if len(cur) > 0 {
			out = append(out, s[cur[0].a:cur[len(cur)-1].b])
			cur = cur[:0]
		}
	}
	for i, p := range ps {
		switch behavior {
		case hfRemoved:
			if !p.match {
				out = append(out, s[p.a:p.b])
			}
		case hfIsolated:
			out = append(out, s[p.a:p.b])
		case hfMergedWithPrevious:
			if p.match && len(cur) > 0 {
				cur = append(cur, p)
				flush()
			} else {
				flush()
				cur = append(cur, p)
				if p.match {
					flush()
				}
			}
		case hfMergedWithNext: // a match joins the piece after it unless that is a match
			if p.match {
				flush()
			}
			cur = append(cur, p)
			if !p.match || i == len(ps)-1 {
				flush()
			}
		case hfContiguous: // runs of matches become one piece
			if len(cur) > 0 && cur[len(cur)-1].match != p.match {
				flush()
			}
			cur = append(cur, p)
		}
	}
	flush()
	return out
}

// hfByteLevelPre is the ByteLevel pre-tokenizer: an optional leading space, the GPT-2 split
// regex when use_regex, then every byte mapped to its printable stand-in.
type hfByteLevelPre struct {
	addPrefixSpace bool
	re             *hfSplitPre // nil: no regex split
}

// gpt2Pattern is the regex of tokenizers' ByteLevel pre-tokenizer.
const gpt2Pattern = `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`

func (p hfByteLevelPre) split(words []string, _ bool) []string {
	var out []string
	for _, w := range words {
		if p.addPrefixSpace && !strings.HasPrefix(w, " ") {
			w = " " + w
		}
		if p.re != nil {
			for _, x := range p.re.split([]string{w}, false) {
				out = append(out, byteLevelEncode(x))
			}
			continue
		}
		out = append(out, byteLevelEncode(w))
	}
	return out
}

// hfMetaspacePre is the Metaspace pre-tokenizer: spaces become the replacement, which is
// prepended (always, or to the first section only), and words start at each replacement.
type hfMetaspacePre struct {
	replacement string
	prepend     bool // prepend_scheme always or first
	firstOnly   bool // first: only to the word at the start of the text
	split_      bool
}

func (p hfMetaspacePre) split(words []string, first bool) []string {
	var out []string
	for i, w := range words {
		w = strings.ReplaceAll(w, " ", p.replacement)
		if p.prepend && !strings.HasPrefix(w, p.replacement) && (!p.firstOnly || first && i == 0) {
			w = p.replacement + w
		}
		if !p.split_ {
			out = append(out, w)
			continue
		}
		var ms [][2]int
		for j := 0; ; {
			k := strings.Index(w[j:], p.replacement)
			if k < 0 {
				break
			}
			ms = append(ms, [2]int{j + k, j + k + len(p.replacement)})
			j += k + len(p.replacement)
		}
		out = splitByMatches(out, w, ms, hfMergedWithNext, false)
	}
	return out
}

// hfDigitsPre is the Digits pre-tokenizer.
type hfDigitsPre struct{ individual bool }

var digitRuns = regexp.MustCompile(`\p{Nd}+`)
var digitOne = regexp.MustCompile(`\p{Nd}`)

func (p hfDigitsPre) split(words []string, _ bool) []string {
	var out []string
	re := digitRuns
	if p.individual {
		re = digitOne
	}
	for _, w := range words {
		var ms [][2]int
		for _, m := range re.FindAllStringIndex(w, -1) {
			ms = append(ms, [2]int{m[0], m[1]})
		}
		out = splitByMatches(out, w, ms, hfIsolated, false)
	}
	return out
}

// parseHFPreTokenizer builds tokenizer.json's pre_tokenizer as a flat list; nil when none.
func parseHFPreTokenizer(raw json.RawMessage) ([]hfPreTokenizer, error) {
	if isJSONNull(raw) {
		return nil, nil
	}
	var c struct {
		Type           string            `json:"type"`
		PreTokenizers  []json.RawMessage `json:"pretokenizers"`
		Pattern        hfPattern         `json:"pattern"`
		Behavior       string            `json:"behavior"`
		Invert         bool              `json:"invert"`
		AddPrefixSpace *bool             `json:"add_prefix_space"`
		UseRegex       *bool             `json:"use_regex"`
		Replacement    string            `json:"replacement"`
		PrependScheme  string            `json:"prepend_scheme"`
		Split          *bool             `json:"split"`
		Individual     bool              `json:"individual_digits"`
	}
	if err := json.Unmarshal(raw, &c); err != nil {
		return nil, fmt.Errorf("%w: pre_tokenizer: %v", ErrTokenizer, err)
	}
	switch c.Type {
	case "Sequence":
		var out []hfPreTokenizer
		for _, r := range c.PreTokenizers {
			p, err := parseHFPreTokenizer(r)
			if err != nil {
				return nil, err
			}
			out = append(out, p...)
		}
		return out, nil
	case "Split":
		lit, re, err := c.Pattern.compile("pre_tokenizer Split")
		if err != nil {
			return nil, err
		}
		b, ok := map[string]hfSplitBehavior{
			"Removed": hfRemoved, "Isolated": hfIsolated, "MergedWithPrevious": hfMergedWithPrevious,
			"MergedWithNext": hfMergedWithNext, "Contiguous": hfContiguous,
		}[c.Behavior]
		if !ok {
			return nil, fmt.Errorf("%w: pre_tokenizer Split: behavior %q unsupported", ErrTokenizer, c.Behavior)
		}
		sp := hfSplitPre{literal: lit, re: re, behavior: b, invert: c.Invert}
		if c.Pattern.Regex != nil {
			sp.fast = fastSplitFor(*c.Pattern.Regex)
		}
		return []hfPreTokenizer{sp}, nil
	case "ByteLevel":
		p := hfByteLevelPre{addPrefixSpace: c.AddPrefixSpace == nil || *c.AddPrefixSpace}
		if c.UseRegex == nil || *c.UseRegex {
			re, err := compileHFRegex("pre_tokenizer ByteLevel", gpt2Pattern)
			if err != nil {
				return nil, err
			}
			p.re = &hfSplitPre{re: re, behavior: hfIsolated}
		}
		return []hfPreTokenizer{p}, nil
	case "Metaspace":
		if utf8.RuneCountInString(c.Replacement) != 1 {
			return nil, fmt.Errorf("%w: pre_tokenizer Metaspace: replacement %q is not one character", ErrTokenizer, c.Replacement)
		}
		p := hfMetaspacePre{replacement: c.Replacement, split_: c.Split == nil || *c.Split}
		switch c.PrependScheme {
		case "always":
			p.prepend = true
		case "first":
			p.prepend, p.firstOnly = true, true
		case "never":
		case "": // before prepend_scheme: add_prefix_space (default true)
			p.prepend = c.AddPrefixSpace == nil || *c.AddPrefixSpace
		default:
			return nil, fmt.Errorf("%w: pre_tokenizer Metaspace: prepend_scheme %q unsupported", ErrTokenizer, c.PrependScheme)
		}
		return []hfPreTokenizer{p}, nil
	case "Digits":
		return []hfPreTokenizer{hfDigitsPre{c.Individual}}, nil
	case "":
		return nil, fmt.Errorf("%w: pre_tokenizer has no type", ErrTokenizer)
	default:
		return nil, fmt.Errorf("%w: pre_tokenizer %q unsupported (Sequence, Split, ByteLevel, Metaspace, Digits)", ErrTokenizer, c.Type)
	}
}

// byteLevelEnc maps each byte to the printable rune GPT-2's bytes_to_unicode gives it;
// byteLevelDecode is its inverse.
var (
	byteLevelEnc    [256]string
	byteLevelDecode = map[rune]byte{}
)

func init() {
	n := 0
	for b := 0; b < 256; b++ {
		r := rune(b)
		if !(b >= '!' && b <= '~' || b >= 0xA1 && b <= 0xAC || b >= 0xAE && b <= 0xFF) {
			r = rune(256 + n)
			n++
		}
		byteLevelEnc[b] = string(r)
		byteLevelDecode[r] = byte(b)
	}
}

func byteLevelEncode(s string) string {
	var sb strings.Builder
	sb.Grow(2 * len(s))
	for i := 0; i < len(s); i++ {
		sb.WriteString(byteLevelEnc[s[i]])
	}
	return sb.String()
}

// hfAddedTokens finds added tokens in text: first those with normalized=false in the raw
// text, then those with normalized=true in the normalized text between them, each pass
// leftmost-longest as tokenizers' Aho-Corasick matcher, a single_word token only where no
// word character touches it, lstrip/rstrip taking the spaces beside it.
type hfAddedTokens struct {
	tokens []hfAddedToken
	raw    hfTokenSet
	normed hfTokenSet
}

type hfTokenSet struct {
	byFirst [256][]int     // first byte → indices into list, longest first
	list    []hfAddedToken // with Content the pattern (normalized for the normalized set)
}

func (s *hfTokenSet) add(a hfAddedToken) {
	s.list = append(s.list, a)
	s.byFirst[a.Content[0]] = append(s.byFirst[a.Content[0]], len(s.list)-1)
}

func (s *hfTokenSet) sort() {
	for _, idx := range s.byFirst {
		sort.SliceStable(idx, func(i, j int) bool { return len(s.list[idx[i]].Content) > len(s.list[idx[j]].Content) })
	}
}

func (a *hfAddedTokens) compile(n hfNormalizer) error {
	for _, t := range a.tokens {
		if t.Normalized {
			if n != nil {
				t.Content = n.normalize(t.Content)
			}
			if t.Content == "" {
				continue
			}
			a.normed.add(t)
		} else {
			a.raw.add(t)
		}
	}
	a.raw.sort()
	a.normed.sort()
	return nil
}

// find returns the token matches in s as (start, stop, id), after single_word filtering and
// lstrip/rstrip widening, as tokenizers' AddedVocabulary::find_matches.
func (s *hfTokenSet) find(text string) [][3]int {
	if len(s.list) == 0 {
		return nil
	}
	var out [][3]int
	startOffset := 0
	for i := 0; i < len(text); {
		best := -1
		for _, k := range s.byFirst[text[i]] {
			if strings.HasPrefix(text[i:], s.list[k].Content) {
				best = k
				break
			}
		}
		if best < 0 {
			i++
			continue
		}
		tok := s.list[best]
		start, stop := i, i+len(tok.Content)
		i = stop
		if tok.SingleWord && (start > 0 && endsWithWord(text[:start]) || stop < len(text) && startsWithWord(text[stop:])) {
			continue
		}
		if tok.LStrip {
			start = max(len(strings.TrimRightFunc(text[:start], unicode.IsSpace)), startOffset)
		}
		if tok.RStrip {
			stop = len(text) - len(strings.TrimLeftFunc(text[stop:], unicode.IsSpace))
			i = stop
		}
		out = append(out, [3]int{start, stop, tok.ID})
		startOffset = stop
	}
	return out
}

func isWordRune(r rune) bool {
	return r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r) || unicode.Is(unicode.M, r)
}

func endsWithWord(s string) bool {
	r, _ := utf8.DecodeLastRuneInString(s)
	return isWordRune(r)
}

func startsWithWord(s string) bool {
	r, _ := utf8.DecodeRuneInString(s)
	return isWordRune(r)
}

// split calls emit for each piece of text in order: an added token as (its text, id), the
// normalized text between tokens as (text, -1); first is true for a piece that starts the
// text. Empty pieces are skipped.
func (a *hfAddedTokens) split(text string, n hfNormalizer, emit func(s string, id int, first bool)) {
	prev := 0
	between := func(s string, atStart bool) {
		if s == "" {
			return
		}
		if n != nil {
			s = n.normalize(s)
		}
		p := 0
		for _, m := range a.normed.find(s) {
			if p < m[0] {
				emit(s[p:m[0]], -1, atStart && p == 0)
			}
			emit(s[m[0]:m[1]], m[2], false)
			p = m[1]
		}
		if p < len(s) {
			emit(s[p:], -1, atStart && p == 0)
		}
	}
	for _, m := range a.raw.find(text) {
		between(text[prev:m[0]], prev == 0)
		emit(text[m[0]:m[1]], m[2], false)
		prev = m[1]
	}
	between(text[prev:], prev == 0)
}

// hfDecoderKind is how Decode turns pieces back into text.
type hfDecoderKind int

const (
	hfDecodePlain     hfDecoderKind = iota // concatenate the pieces
	hfDecodeByteLevel                      // map the GPT-2 alphabet back to bytes
	hfDecodeMetaspace                      // ▁ → space, byte fallback, strip one leading space
)

// parseHFDecoder reads the decoder's kind. The decoder does not take part in encoding, so
// an unknown one is not an error: Decode then concatenates the pieces.
func parseHFDecoder(raw json.RawMessage) hfDecoderKind {
	var c struct {
		Type     string            `json:"type"`
		Decoders []json.RawMessage `json:"decoders"`
		Content  string            `json:"content"`
	}
	if isJSONNull(raw) || json.Unmarshal(raw, &c) != nil {
		return hfDecodePlain
	}
	switch c.Type {
	case "ByteLevel":
		return hfDecodeByteLevel
	case "Metaspace":
		return hfDecodeMetaspace
	case "Replace":
		if c.Content == " " {
			return hfDecodeMetaspace
		}
	case "Sequence":
		k := hfDecodePlain
		for _, d := range c.Decoders {
			if x := parseHFDecoder(d); x != hfDecodePlain {
				k = x
			}
		}
		return k
	}
	return hfDecodePlain
}
