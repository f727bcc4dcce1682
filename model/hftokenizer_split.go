package model

import (
	"unicode"
	"unicode/utf8"
)

// The pre-tokenizer regexes of LLaMA-3 and of Qwen2/Qwen3 (GPT-4's cl100k pattern, with
// up to three digits or one digit per number). A Split with exactly one of these patterns
// uses gpt4Split, a hand-written matcher with the same matches as the regex run by regexp2
// (backtracking, leftmost alternative first): TestHFFastSplitMatchesRegexp2 checks them
// against each other. Any other pattern runs on regexp2.
const (
	llama3SplitPattern = `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
	qwenSplitPattern   = `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
)

// gpt4Split is the hand-written matcher of the patterns above; maxDigits is 3 (LLaMA-3) or
// 1 (Qwen).
type gpt4Split struct{ maxDigits int }

// fastSplitFor returns the hand-written matcher of a known pattern, or nil.
func fastSplitFor(pattern string) *gpt4Split {
	switch pattern {
	case llama3SplitPattern:
		return &gpt4Split{maxDigits: 3}
	case qwenSplitPattern:
		return &gpt4Split{maxDigits: 1}
	}
	return nil
}

// \s, \p{L} and \p{N} as regexp2 reads them (Unicode White_Space, L, N).
func isWS(r rune) bool     { return unicode.IsSpace(r) }
func isLetter(r rune) bool { return unicode.IsLetter(r) }
func isNum(r rune) bool    { return unicode.IsNumber(r) }

// isPunctLike is [^\s\p{L}\p{N}].
func isPunctLike(r rune) bool { return !isWS(r) && !isLetter(r) && !isNum(r) }

// matches returns the matches of the pattern in s, which cover s without gaps.
func (g *gpt4Split) matches(s string) [][2]int {
	out := make([][2]int, 0, len(s)/4+1)
	for i := 0; i < len(s); {
		j := g.next(s, i)
		out = append(out, [2]int{i, j})
		i = j
	}
	return out
}

// runEnd returns the end of the run of runes satisfying f starting at i.
func runEnd(s string, i int, f func(rune) bool) int {
	for i < len(s) {
		r, n := utf8.DecodeRuneInString(s[i:])
		if !f(r) {
			break
		}
		i += n
	}
	return i
}

// next returns the end of the match starting at i < len(s): every rune starts a match.
func (g *gpt4Split) next(s string, i int) int {
	r, n := utf8.DecodeRuneInString(s[i:])
	// (?i:'s|'t|'re|'ve|'m|'ll|'d), with ASCII case variants as transformers.js rewrites it.
	if r == '\'' && i+1 < len(s) {
		switch s[i+1] | 0x20 {
		case 's', 't', 'm', 'd':
			return i + 2
		case 'r', 'v':
			if i+2 < len(s) && s[i+2]|0x20 == 'e' {
				return i + 3
			}
		case 'l':
			if i+2 < len(s) && s[i+2]|0x20 == 'l' {
				return i + 3
			}
		}
	}
	// [^\r\n\p{L}\p{N}]?\p{L}+
	if isLetter(r) {
		return runEnd(s, i+n, isLetter)
	}
	if r != '\r' && r != '\n' && !isNum(r) && i+n < len(s) {
		if r2, n2 := utf8.DecodeRuneInString(s[i+n:]); isLetter(r2) {
			return runEnd(s, i+n+n2, isLetter)
		}
	}
	// \p{N}{1,maxDigits}
	if isNum(r) {
		j := i + n
		for k := 1; k < g.maxDigits && j < len(s); k++ {
			r2, n2 := utf8.DecodeRuneInString(s[j:])
			if !isNum(r2) {
				break
			}
			j += n2
		}
		return j
	}
	//  ?[^\s\p{L}\p{N}]+[\r\n]*
	j := i
	if r == ' ' {
		j = i + 1
	}
	if k := runEnd(s, j, isPunctLike); k > j {
		return runEnd(s, k, func(r rune) bool { return r == '\r' || r == '\n' })
	}
	// Here r is whitespace. \s*[\r\n]+: up to the run's last \r or \n.
	end := i
	lastNL, lastStart := -1, i
	for end < len(s) {
		r2, n2 := utf8.DecodeRuneInString(s[end:])
		if !isWS(r2) {
			break
		}
		if r2 == '\r' || r2 == '\n' {
			lastNL = end
		}
		lastStart = end
		end += n2
	}
	if lastNL >= 0 {
		return lastNL + 1
	}
	// \s+(?!\S): the whole run at the end of s, else all but its last rune.
	if end == len(s) || lastStart == i {
		return end // \s+ when the run is one rune before a non-space
	}
	return lastStart
}
