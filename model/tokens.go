package model

import (
	"context"
	"errors"
	"fmt"
	"io"
)

// ErrData is wrapped by every error about the content of a data file.
var ErrData = errors.New("model: bad data file")

// ReadTokenStream reads a whole data file as one token stream under the lines protocol:
// ReadTokens with the zero DataOptions.
//
// A text file: every line holding a non-whitespace character is one document, the
// document start (tok.DocumentStart(), when ≥ 0) followed by tok.Encode(line) (the line
// without its "\n" or "\r\n"); documents are concatenated in file order and blank or
// whitespace-only lines are skipped. A text file with tok == nil is an error wrapping
// ErrNoTokenizer: the model has no tokenizer, so give token data.
//
// A JSON Lines file (extension .jsonl or .json, or a file whose first non-space byte is
// '{'): each non-blank line is an object whose "input_ids" array of integers is appended as
// given; tok may be nil. Parquet and Arrow IPC files: see ReadTokens.
//
// Every id must lie in [0, vocab); an id outside, invalid JSON or a line without input_ids
// is an error wrapping ErrData that names the file and the 1-based line. A file that cannot
// be read gives the os error (errors.Is(err, fs.ErrNotExist) for a missing one). A line
// longer than MaxLineBytes is an error wrapping ErrTooLarge. ReadTokenStream panics when
// vocab ≤ 0.
func ReadTokenStream(path string, tok Tokenizer, vocab int) ([]int, error) {
	return ReadTokens(context.Background(), path, tok, vocab, DataOptions{})
}

// readTokenStream is the lines protocol over the text or JSON Lines r, named name in
// errors (format FormatText sniffs JSON Lines from the first non-blank line).
func readTokenStream(r io.Reader, name string, format DataFormat, tok Tokenizer, vocab int) ([]int, error) {
	b := &streamBuilder{name: name, tok: tok, vocab: vocab}
	err := lineDocuments(context.Background(), r, name, format, func(d document) (bool, error) {
		if d.blank {
			return false, nil
		}
		return false, b.add(d)
	})
	if err != nil {
		return nil, err
	}
	return b.stream, nil
}

// Windows cuts stream into consecutive non-overlapping windows of exactly seqLen tokens,
// dropping the remainder; max > 0 keeps only the first max windows. The windows alias
// stream (each capped at its own length, so appending to one does not overwrite the next).
// Windows panics when seqLen ≤ 0.
func Windows(stream []int, seqLen, max int) [][]int {
	if seqLen <= 0 {
		panic(fmt.Sprintf("model: Windows: seqLen %d", seqLen))
	}
	n := len(stream) / seqLen
	if max > 0 && n > max {
		n = max
	}
	w := make([][]int, n)
	for i := range w {
		w[i] = stream[i*seqLen : (i+1)*seqLen : (i+1)*seqLen]
	}
	return w
}
