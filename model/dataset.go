package model

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// Protocol is how an evaluation file becomes one token stream.
type Protocol string

const (
	// ProtocolLines: every non-blank line (text file) or row (a Parquet/Arrow text column) is
	// one document, the document start followed by encode(line); documents are concatenated.
	// Calibration and training data always use it.
	ProtocolLines Protocol = "lines"
	// ProtocolJoin is the paper's WikiText-2 protocol: a text file taken whole as one string
	// (newlines kept), or a text column as "\n\n".join(all rows, blank ones included),
	// encoded once with the document start put in front once.
	ProtocolJoin Protocol = "join"
)

// ParseProtocol returns the protocol named s ("" is lines).
func ParseProtocol(s string) (Protocol, error) {
	switch Protocol(s) {
	case "", ProtocolLines:
		return ProtocolLines, nil
	case ProtocolJoin:
		return ProtocolJoin, nil
	}
	return "", fmt.Errorf("model: protocol %q: want lines or join", s)
}

// Limits of the data readers.
const (
	// MaxLineBytes bounds one line of a text or JSON Lines file (and one row of a text
	// column under the lines protocol): a longer one is an error wrapping ErrData.
	MaxLineBytes = 16 << 20
	// MaxJoinBytes bounds the text the join protocol encodes as one string.
	MaxJoinBytes = 256 << 20
	// DefaultTextColumn is the column of a Parquet or Arrow file read as text by default.
	DefaultTextColumn = "text"
	// TokenColumn is the integer-list column of a Parquet or Arrow file taken as token ids.
	TokenColumn = "input_ids"
)

// ErrTooLarge is wrapped when a data file or one of its lines exceeds a limit.
var ErrTooLarge = errors.New("model: data too large")

// DataOptions says how ReadTokens reads a data file. The zero value is the lines protocol
// over the "text" column, reading the whole file.
type DataOptions struct {
	Protocol   Protocol // "" is ProtocolLines
	TextColumn string   // column of a Parquet/Arrow file read as text; "" is DefaultTextColumn
	// MaxTokens > 0 stops reading once the stream holds at least MaxTokens tokens (the
	// windows the caller needs); the stream may then be longer. Ignored under join, whose
	// text is encoded whole.
	MaxTokens int
}

// DataFormat is the container of a data file.
type DataFormat string

const (
	FormatText        DataFormat = "text"         // one document per line
	FormatJSONL       DataFormat = "jsonl"        // one {"input_ids": [...]} object per line
	FormatParquet     DataFormat = "parquet"      // Apache Parquet
	FormatArrowFile   DataFormat = "arrow-file"   // Arrow IPC file format (magic ARROW1)
	FormatArrowStream DataFormat = "arrow-stream" // Arrow IPC stream format (the Hugging Face datasets cache)
)

// DetectFormat says how path is read: by its first bytes (Parquet's "PAR1", the Arrow IPC
// file magic "ARROW1", an Arrow IPC stream's continuation marker 0xFFFFFFFF), then by its
// extension (.parquet; .arrow/.arrows/.ipc/.feather without the file magic: a stream;
// .jsonl/.json), else text; a text file whose first non-space byte is '{' is then read as
// JSON Lines by the reader. It returns the os error for a file that cannot be opened.
func DetectFormat(path string) (DataFormat, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("model: read data: %w", err)
	}
	defer f.Close()
	head := make([]byte, 8)
	n, err := io.ReadFull(f, head)
	if err != nil && err != io.EOF && err != io.ErrUnexpectedEOF {
		return "", fmt.Errorf("model: read %s: %w", path, err)
	}
	head = head[:n]
	ext := strings.ToLower(filepath.Ext(path))
	switch {
	case bytes.HasPrefix(head, []byte("PAR1")):
		return FormatParquet, nil
	case bytes.HasPrefix(head, []byte("ARROW1")):
		return FormatArrowFile, nil
	case bytes.HasPrefix(head, []byte{0xff, 0xff, 0xff, 0xff}):
		return FormatArrowStream, nil
	case ext == ".parquet":
		return FormatParquet, nil
	case ext == ".arrow" || ext == ".arrows" || ext == ".ipc" || ext == ".feather":
		return FormatArrowStream, nil
	case ext == ".jsonl" || ext == ".json":
		return FormatJSONL, nil
	}
	return FormatText, nil
}

// document is one unit of a data file: text to encode, or token ids given as they are.
type document struct {
	text   string
	ids    []int64
	isText bool
	blank  bool   // a blank line or row (skipped under lines; kept by join for a column)
	where  string // "name:line" or "name: row N", for errors
}

// ReadTokens reads a data file as one token stream by opt.Protocol (see Protocol) and
// returns it. Formats (DetectFormat): a text file (one document per line), JSON Lines
// ({"input_ids": [...]} per line, appended as given), a Parquet or Arrow IPC file (file or
// stream format) whose opt.TextColumn string column is read as text, one row per line, or,
// without that column, whose "input_ids" integer-list column is taken as tokens.
//
// Text needs tok (else an error wrapping ErrNoTokenizer); its documents start with
// tok.DocumentStart() when that is ≥ 0. Every id must lie in [0, vocab). The file is read
// as a stream: under lines, reading stops once opt.MaxTokens tokens are held; a line longer
// than MaxLineBytes, or join text longer than MaxJoinBytes, is an error wrapping
// ErrTooLarge and ErrData. Errors about the content wrap ErrData and name the file and the
// 1-based line (or row, or the missing column); an unreadable file gives the os error. ctx
// is checked between documents. ReadTokens panics when vocab ≤ 0.
func ReadTokens(ctx context.Context, path string, tok Tokenizer, vocab int, opt DataOptions) ([]int, error) {
	if vocab <= 0 {
		panic(fmt.Sprintf("model: ReadTokens: vocabulary size %d", vocab))
	}
	proto, err := ParseProtocol(string(opt.Protocol))
	if err != nil {
		return nil, err
	}
	col := opt.TextColumn
	if col == "" {
		col = DefaultTextColumn
	}
	format, err := DetectFormat(path)
	if err != nil {
		return nil, err
	}
	b := &streamBuilder{name: path, tok: tok, vocab: vocab}
	if proto == ProtocolJoin {
		return b.join(ctx, path, format, col)
	}
	err = forEachDocument(ctx, path, format, col, func(d document) (bool, error) {
		if d.blank {
			return false, nil
		}
		if err := b.add(d); err != nil {
			return false, err
		}
		return opt.MaxTokens > 0 && len(b.stream) >= opt.MaxTokens, nil
	})
	if err != nil {
		return nil, err
	}
	return b.stream, nil
}

// streamBuilder appends documents to a token stream, checking the ids.
type streamBuilder struct {
	name   string
	tok    Tokenizer
	vocab  int
	stream []int
}

func (b *streamBuilder) needTokenizer() error {
	if b.tok == nil {
		return fmt.Errorf("%w: %s is text, but the model has no tokenizer: give token data (JSON Lines or a Parquet/Arrow %s column)", ErrNoTokenizer, b.name, TokenColumn)
	}
	return nil
}

// add appends one document: the document start and the ids of its text, or its ids.
func (b *streamBuilder) add(d document) error {
	if !d.isText {
		for _, id := range d.ids {
			if id < 0 || id >= int64(b.vocab) {
				return fmt.Errorf("%w: %s: token id %d outside the vocabulary [0,%d)", ErrData, d.where, id, b.vocab)
			}
			b.stream = append(b.stream, int(id))
		}
		return nil
	}
	if err := b.needTokenizer(); err != nil {
		return err
	}
	return b.addText(d.text, d.where)
}

// addText appends the document start and encode(text).
func (b *streamBuilder) addText(text, where string) error {
	n := len(b.stream)
	if s := b.tok.DocumentStart(); s >= 0 {
		b.stream = append(b.stream, s)
	}
	b.stream = append(b.stream, b.tok.Encode(text)...)
	for _, id := range b.stream[n:] {
		if id < 0 || id >= b.vocab {
			return fmt.Errorf("%w: %s: token id %d outside the vocabulary [0,%d) (tokenizer and model disagree)", ErrData, where, id, b.vocab)
		}
	}
	return nil
}

// join reads the file by the join protocol.
func (b *streamBuilder) join(ctx context.Context, path string, format DataFormat, col string) ([]int, error) {
	if format == FormatText {
		f, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("model: read data: %w", err)
		}
		defer f.Close()
		br := bufio.NewReader(f)
		if c, err := firstNonSpace(br); err == nil && c == '{' {
			format = FormatJSONL // token data: read below as under lines
		} else {
			var text strings.Builder // read without a copy into the string encoded
			if fi, err := f.Stat(); err == nil && fi.Mode().IsRegular() && fi.Size() <= MaxJoinBytes {
				text.Grow(int(fi.Size()))
			}
			if _, err := io.Copy(&text, io.LimitReader(br, MaxJoinBytes+1)); err != nil {
				return nil, fmt.Errorf("model: read %s: %w", path, err)
			}
			if text.Len() > MaxJoinBytes {
				return nil, fmt.Errorf("%w: %w: %s is over %d MiB, the most --protocol join encodes as one string", ErrData, ErrTooLarge, path, MaxJoinBytes>>20)
			}
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			if err := b.needTokenizer(); err != nil {
				return nil, err
			}
			return b.stream, b.addText(text.String(), path)
		}
	}
	// A text column: "\n\n".join(rows); token data: the ids concatenated as given.
	var sb strings.Builder
	rows, text := 0, false
	err := forEachDocument(ctx, path, format, col, func(d document) (bool, error) {
		if !d.isText {
			if d.blank {
				return false, nil
			}
			return false, b.add(d)
		}
		text = true
		if rows > 0 {
			sb.WriteString("\n\n")
		}
		sb.WriteString(d.text)
		rows++
		if sb.Len() > MaxJoinBytes {
			return false, fmt.Errorf("%w: %w: the joined %s column of %s is over %d MiB (at %s), the most --protocol join encodes as one string", ErrData, ErrTooLarge, col, path, MaxJoinBytes>>20, d.where)
		}
		return false, nil
	})
	if err != nil {
		return nil, err
	}
	if !text {
		return b.stream, nil
	}
	if err := b.needTokenizer(); err != nil {
		return nil, err
	}
	return b.stream, b.addText(sb.String(), path)
}

// firstNonSpace peeks at the first non-whitespace byte of br without consuming it.
func firstNonSpace(br *bufio.Reader) (byte, error) {
	for n := 1; ; n++ {
		p, err := br.Peek(n)
		if len(p) < n {
			if err == nil {
				err = io.EOF
			}
			return 0, err
		}
		switch c := p[n-1]; c {
		case ' ', '\t', '\n', '\r', '\v', '\f':
			if n >= br.Size() {
				return 0, io.EOF
			}
		default:
			return c, nil
		}
	}
}

// forEachDocument calls fn for every document of the file in order until fn returns true
// or an error.
func forEachDocument(ctx context.Context, path string, format DataFormat, col string, fn func(document) (bool, error)) error {
	switch format {
	case FormatParquet:
		return parquetDocuments(ctx, path, col, fn)
	case FormatArrowFile, FormatArrowStream:
		return arrowDocuments(ctx, path, format, col, fn)
	}
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("model: read data: %w", err)
	}
	defer f.Close()
	return lineDocuments(ctx, f, path, format, fn)
}

// lineDocuments reads r line by line (text or JSON Lines; FormatText turns into JSON Lines
// when the first non-blank line starts with '{').
func lineDocuments(ctx context.Context, r io.Reader, name string, format DataFormat, fn func(document) (bool, error)) error {
	br := bufio.NewReaderSize(r, 1<<16)
	var buf []byte
	jsonl := format == FormatJSONL
	decided := jsonl
	for lineNo := 1; ; lineNo++ {
		if lineNo%1024 == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		line, err := readLine(br, buf[:0], MaxLineBytes)
		buf = line
		if errors.Is(err, ErrTooLarge) {
			return fmt.Errorf("%w: %w: %s:%d: a line is longer than %d MiB (is it a text or JSON Lines file?)", ErrData, ErrTooLarge, name, lineNo, MaxLineBytes>>20)
		}
		if err != nil && err != io.EOF {
			return fmt.Errorf("model: read %s: %w", name, err)
		}
		if len(line) == 0 && err == io.EOF {
			return nil
		}
		line = bytes.TrimSuffix(line, []byte("\r"))
		trimmed := bytes.TrimSpace(line)
		d := document{where: fmt.Sprintf("%s:%d", name, lineNo), blank: len(trimmed) == 0}
		if !d.blank && !decided {
			jsonl, decided = trimmed[0] == '{', true
		}
		switch {
		case d.blank:
			d.isText = !jsonl
		case jsonl:
			var rec struct {
				InputIDs *[]int64 `json:"input_ids"`
			}
			if err := json.Unmarshal(trimmed, &rec); err != nil {
				return fmt.Errorf("%w: %s: %w", ErrData, d.where, err)
			}
			if rec.InputIDs == nil {
				return fmt.Errorf("%w: %s: no input_ids", ErrData, d.where)
			}
			d.ids = *rec.InputIDs
		default:
			d.text, d.isText = string(line), true
		}
		stop, ferr := fn(d)
		if ferr != nil || stop {
			return ferr
		}
		if err == io.EOF {
			return nil
		}
	}
}

// readLine appends the next line of br (without its "\n") to buf. A line longer than
// limit bytes gives ErrTooLarge; the last line may end at io.EOF without a newline.
func readLine(br *bufio.Reader, buf []byte, limit int) ([]byte, error) {
	for {
		frag, err := br.ReadSlice('\n')
		if len(buf)+len(frag) > limit+1 || (len(buf)+len(frag) == limit+1 && err != nil) {
			return buf, ErrTooLarge
		}
		buf = append(buf, frag...)
		switch err {
		case nil:
			return buf[:len(buf)-1], nil
		case bufio.ErrBufferFull:
			continue
		default:
			return buf, err
		}
	}
}
