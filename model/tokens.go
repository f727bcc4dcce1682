package model

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// ErrData is wrapped by every error about the content of a data file.
var ErrData = errors.New("model: bad data file")

// streamFormat is how a data file is read.
type streamFormat int

const (
	formatAuto  streamFormat = iota // JSON Lines when the first non-space byte is '{', else text
	formatText                      // one document per non-blank line
	formatJSONL                     // one {"input_ids": [...]} object per line
)

// ReadTokenStream reads a data file as one token stream (the windows protocol).
//
// A text file: every line holding a non-whitespace character is one document, BOS followed
// by tok.Encode(line) (the line without its "\n" or "\r\n"); documents are concatenated in
// file order and blank or whitespace-only lines are skipped. A text file with tok == nil is
// an error wrapping ErrNoTokenizer: the model has no tokenizer, so give token data.
//
// A JSON Lines file (extension .jsonl or .json, or a file whose first non-space byte is
// '{'): each non-blank line is an object whose "input_ids" array of integers is appended as
// given; tok may be nil.
//
// Every id must lie in [0, vocab); an id outside, invalid JSON or a line without input_ids
// is an error wrapping ErrData that names the file and the 1-based line. A file that cannot
// be read gives the os error (errors.Is(err, fs.ErrNotExist) for a missing one). Lines may
// be of any length. ReadTokenStream panics when vocab ≤ 0.
func ReadTokenStream(path string, tok Tokenizer, vocab int) ([]int, error) {
	if vocab <= 0 {
		panic(fmt.Sprintf("model: ReadTokenStream: vocabulary size %d", vocab))
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("model: read token stream: %w", err)
	}
	defer f.Close()
	format := formatAuto
	switch strings.ToLower(filepath.Ext(path)) {
	case ".jsonl", ".json":
		format = formatJSONL
	}
	return readTokenStream(f, path, format, tok, vocab)
}

// readTokenStream is ReadTokenStream on r, named name in errors.
func readTokenStream(r io.Reader, name string, format streamFormat, tok Tokenizer, vocab int) ([]int, error) {
	br := bufio.NewReaderSize(r, 1<<16)
	var stream []int
	for lineNo := 1; ; lineNo++ {
		line, err := br.ReadString('\n')
		if err != nil && err != io.EOF {
			return nil, fmt.Errorf("model: read %s: %w", name, err)
		}
		if line == "" && err == io.EOF {
			return stream, nil
		}
		line = strings.TrimSuffix(line, "\n")
		line = strings.TrimSuffix(line, "\r")
		trimmed := strings.TrimSpace(line)
		if trimmed != "" {
			if format == formatAuto {
				format = formatText
				if trimmed[0] == '{' {
					format = formatJSONL
				}
			}
			n := len(stream)
			switch format {
			case formatText:
				if tok == nil {
					return nil, fmt.Errorf("%w: %s is text, but the model has no tokenizer: give token data (JSON Lines with input_ids)", ErrNoTokenizer, name)
				}
				stream = append(stream, tok.BOS())
				stream = append(stream, tok.Encode(line)...)
				for _, id := range stream[n:] {
					if id < 0 || id >= vocab {
						return nil, fmt.Errorf("%w: %s:%d: token id %d outside the vocabulary [0,%d) (tokenizer and model disagree)", ErrData, name, lineNo, id, vocab)
					}
				}
			case formatJSONL:
				var rec struct {
					InputIDs *[]int64 `json:"input_ids"`
				}
				if err := json.Unmarshal([]byte(trimmed), &rec); err != nil {
					return nil, fmt.Errorf("%w: %s:%d: %w", ErrData, name, lineNo, err)
				}
				if rec.InputIDs == nil {
					return nil, fmt.Errorf("%w: %s:%d: no input_ids", ErrData, name, lineNo)
				}
				for _, id := range *rec.InputIDs {
					if id < 0 || id >= int64(vocab) {
						return nil, fmt.Errorf("%w: %s:%d: token id %d outside the vocabulary [0,%d)", ErrData, name, lineNo, id, vocab)
					}
					stream = append(stream, int(id))
				}
			}
		}
		if err == io.EOF {
			return stream, nil
		}
	}
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
