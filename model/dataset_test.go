package model

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/apache/arrow/go/v17/arrow"
	"github.com/apache/arrow/go/v17/arrow/array"
	"github.com/apache/arrow/go/v17/arrow/ipc"
	"github.com/apache/arrow/go/v17/arrow/memory"
	"github.com/apache/arrow/go/v17/parquet"
	"github.com/apache/arrow/go/v17/parquet/file"
	"github.com/apache/arrow/go/v17/parquet/schema"
	"google.golang.org/protobuf/encoding/protowire"
)

// writeParquetText writes rows as a Parquet file with one optional string column named
// col (rowsPerGroup rows per row group; a nil entry of null is a null row).
func writeParquetText(t testing.TB, path, col string, rows []string, null []bool, rowsPerGroup int) {
	t.Helper()
	leaf, err := schema.NewPrimitiveNodeLogical(col, parquet.Repetitions.Optional, schema.StringLogicalType{}, parquet.Types.ByteArray, -1, -1)
	if err != nil {
		t.Fatal(err)
	}
	extra, err := schema.NewPrimitiveNode("n", parquet.Repetitions.Required, parquet.Types.Int64, -1, -1)
	if err != nil {
		t.Fatal(err)
	}
	root, err := schema.NewGroupNode("schema", parquet.Repetitions.Required, schema.FieldList{extra, leaf}, -1)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	w := file.NewParquetWriter(f, root)
	for lo := 0; lo < len(rows); lo += rowsPerGroup {
		hi := min(lo+rowsPerGroup, len(rows))
		rg := w.AppendRowGroup()
		cw, err := rg.NextColumn()
		if err != nil {
			t.Fatal(err)
		}
		ns := make([]int64, hi-lo)
		for i := range ns {
			ns[i] = int64(lo + i)
		}
		if _, err := cw.(*file.Int64ColumnChunkWriter).WriteBatch(ns, nil, nil); err != nil {
			t.Fatal(err)
		}
		cw.Close()
		if cw, err = rg.NextColumn(); err != nil {
			t.Fatal(err)
		}
		var vals []parquet.ByteArray
		def := make([]int16, hi-lo)
		for i := lo; i < hi; i++ {
			if null != nil && null[i] {
				continue
			}
			def[i-lo] = 1
			vals = append(vals, parquet.ByteArray(rows[i]))
		}
		if _, err := cw.(*file.ByteArrayColumnChunkWriter).WriteBatch(vals, def, nil); err != nil {
			t.Fatal(err)
		}
		cw.Close()
		rg.Close()
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

// writeParquetTokens writes rows as a Parquet file with a required list<int64> input_ids.
func writeParquetTokens(t testing.TB, path string, rows [][]int64) {
	t.Helper()
	elem, err := schema.NewPrimitiveNode("element", parquet.Repetitions.Required, parquet.Types.Int64, -1, -1)
	if err != nil {
		t.Fatal(err)
	}
	list, err := schema.ListOfWithName(TokenColumn, elem, parquet.Repetitions.Required, -1)
	if err != nil {
		t.Fatal(err)
	}
	root, err := schema.NewGroupNode("schema", parquet.Repetitions.Required, schema.FieldList{list}, -1)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	w := file.NewParquetWriter(f, root)
	rg := w.AppendRowGroup()
	cw, err := rg.NextColumn()
	if err != nil {
		t.Fatal(err)
	}
	var vals []int64
	var def, rep []int16
	for _, r := range rows {
		if len(r) == 0 {
			def, rep = append(def, 0), append(rep, 0)
			continue
		}
		for i, v := range r {
			vals = append(vals, v)
			def = append(def, 1)
			rep = append(rep, int16(min(i, 1)))
		}
	}
	if _, err := cw.(*file.Int64ColumnChunkWriter).WriteBatch(vals, def, rep); err != nil {
		t.Fatal(err)
	}
	cw.Close()
	rg.Close()
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

// writeArrow writes one column (field) of arrays as an Arrow IPC file or stream, one record
// batch per array.
func writeArrow(t testing.TB, path string, stream bool, field arrow.Field, batches []arrow.Array) {
	t.Helper()
	sch := arrow.NewSchema([]arrow.Field{field}, nil)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	type recWriter interface {
		Write(arrow.Record) error
		Close() error
	}
	var w recWriter
	if stream {
		w = ipc.NewWriter(f, ipc.WithSchema(sch))
	} else if w, err = ipc.NewFileWriter(f, ipc.WithSchema(sch)); err != nil {
		t.Fatal(err)
	}
	for _, a := range batches {
		rec := array.NewRecord(sch, []arrow.Array{a}, int64(a.Len()))
		if err := w.Write(rec); err != nil {
			t.Fatal(err)
		}
		rec.Release()
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

func arrowStrings(rows []string, lo, hi int) arrow.Array {
	b := array.NewStringBuilder(memory.DefaultAllocator)
	defer b.Release()
	b.AppendValues(rows[lo:hi], nil)
	return b.NewArray()
}

func arrowTokenLists(rows [][]int64) arrow.Array {
	b := array.NewListBuilder(memory.DefaultAllocator, arrow.PrimitiveTypes.Int32)
	defer b.Release()
	vb := b.ValueBuilder().(*array.Int32Builder)
	for _, r := range rows {
		b.Append(true)
		for _, v := range r {
			vb.Append(int32(v))
		}
	}
	return b.NewArray()
}

func validFileLines(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(sharedPath(t, "data/tinystories/valid.txt"))
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

// TestColumnarLinesMatchText: a Parquet copy of valid.txt (one row per line, several row
// groups) and Arrow IPC file and stream copies give under the lines protocol exactly the
// stream of the text file; MaxTokens stops early at a document boundary.
func TestColumnarLinesMatchText(t *testing.T) {
	tok := tinyTokenizer(t)
	want, err := ReadTokenStream(sharedPath(t, "data/tinystories/valid.txt"), tok, 1024)
	if err != nil {
		t.Fatal(err)
	}
	lines := validFileLines(t)
	dir := t.TempDir()
	pq := filepath.Join(dir, "valid.parquet")
	writeParquetText(t, pq, "text", lines, nil, 700)
	arrowFile := filepath.Join(dir, "valid.arrow.file") // extension says nothing: the magic does
	arrowStream := filepath.Join(dir, "data-00000-of-00001.arrow")
	var batches []arrow.Array
	for lo := 0; lo < len(lines); lo += 1000 {
		batches = append(batches, arrowStrings(lines, lo, min(lo+1000, len(lines))))
	}
	field := arrow.Field{Name: "text", Type: arrow.BinaryTypes.String, Nullable: true}
	writeArrow(t, arrowFile, false, field, batches)
	writeArrow(t, arrowStream, true, field, batches)
	for _, c := range []struct {
		path   string
		format DataFormat
	}{{pq, FormatParquet}, {arrowFile, FormatArrowFile}, {arrowStream, FormatArrowStream}} {
		t.Run(string(c.format), func(t *testing.T) {
			if f, err := DetectFormat(c.path); err != nil || f != c.format {
				t.Fatalf("DetectFormat = %q, %v; want %q", f, err, c.format)
			}
			got, err := ReadTokens(context.Background(), c.path, tok, 1024, DataOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, want) {
				t.Fatalf("%d tokens, the text file gives %d (equal prefix: %v)", len(got), len(want), slices.Equal(got[:min(len(got), len(want))], want[:min(len(got), len(want))]))
			}
			part, err := ReadTokens(context.Background(), c.path, tok, 1024, DataOptions{MaxTokens: 1000})
			if err != nil {
				t.Fatal(err)
			}
			if len(part) < 1000 || len(part) >= len(want) || !slices.Equal(part, want[:len(part)]) {
				t.Fatalf("MaxTokens 1000: %d tokens, not a prefix of at least 1000 of the %d", len(part), len(want))
			}
		})
	}
}

// TestJoinColumn: under join a text column is "\n\n".join(rows), blank and null rows
// included, encoded once after one document start.
func TestJoinColumn(t *testing.T) {
	rows := []string{"Once upon a time.", "", "  ", "The end.", "x"}
	null := []bool{false, false, false, false, true}
	pq := filepath.Join(t.TempDir(), "d.parquet")
	writeParquetText(t, pq, "body", rows, null, 2)
	got, err := ReadTokens(context.Background(), pq, fakeTokenizer{}, 300, DataOptions{Protocol: ProtocolJoin, TextColumn: "body"})
	if err != nil {
		t.Fatal(err)
	}
	want := fakeIDs(true, "Once upon a time.\n\n\n\n  \n\nThe end.\n\n")
	if !slices.Equal(got, want) {
		t.Fatalf("got %v\nwant %v", fakeTokenizer{}.Decode(got), fakeTokenizer{}.Decode(want))
	}
	lines, err := ReadTokens(context.Background(), pq, fakeTokenizer{}, 300, DataOptions{TextColumn: "body"})
	if err != nil {
		t.Fatal(err)
	}
	if want := slices.Concat(fakeIDs(true, "Once upon a time."), fakeIDs(true, "The end.")); !slices.Equal(lines, want) {
		t.Fatalf("lines: got %q", fakeTokenizer{}.Decode(lines))
	}
	// A text file under join: whole, newlines kept, one document start.
	txt := writeData(t, "d.txt", "ab\n\ncd\n")
	got, err = ReadTokens(context.Background(), txt, fakeTokenizer{}, 300, DataOptions{Protocol: ProtocolJoin})
	if err != nil {
		t.Fatal(err)
	}
	if want := fakeIDs(true, "ab\n\ncd\n"); !slices.Equal(got, want) {
		t.Fatalf("text join: got %v, want %v", got, want)
	}
}

// TestColumnarTokens: an input_ids list column (Parquet list<int64>, Arrow list<int32>) is
// taken as tokens; empty lists are skipped.
func TestColumnarTokens(t *testing.T) {
	rows := [][]int64{{1, 5, 7}, {}, {1}, {1, 9, 9, 9}}
	want := []int{1, 5, 7, 1, 1, 9, 9, 9}
	dir := t.TempDir()
	pq := filepath.Join(dir, "t.parquet")
	writeParquetTokens(t, pq, rows)
	st := filepath.Join(dir, "t.arrow")
	writeArrow(t, st, true, arrow.Field{Name: TokenColumn, Type: arrow.ListOf(arrow.PrimitiveTypes.Int32)},
		[]arrow.Array{arrowTokenLists(rows[:2]), arrowTokenLists(rows[2:])})
	for _, p := range []string{pq, st} {
		for _, proto := range []Protocol{ProtocolLines, ProtocolJoin} {
			got, err := ReadTokens(context.Background(), p, nil, 10, DataOptions{Protocol: proto})
			if err != nil {
				t.Fatalf("%s %s: %v", p, proto, err)
			}
			if !slices.Equal(got, want) {
				t.Fatalf("%s %s: got %v, want %v", p, proto, got, want)
			}
		}
		_, err := ReadTokens(context.Background(), p, nil, 9, DataOptions{})
		if !errors.Is(err, ErrData) || !strings.Contains(err.Error(), "row 4") {
			t.Fatalf("%s: id 9 in vocabulary 9: err = %v, want ErrData naming row 4", p, err)
		}
	}
}

// TestDataBadInput: a columnar file without the named column, a line past MaxLineBytes,
// /dev/zero, join text past MaxJoinBytes.
func TestDataBadInput(t *testing.T) {
	dir := t.TempDir()
	pq := filepath.Join(dir, "d.parquet")
	writeParquetText(t, pq, "body", []string{"a"}, nil, 1)
	ar := filepath.Join(dir, "d.arrow")
	writeArrow(t, ar, false, arrow.Field{Name: "body", Type: arrow.BinaryTypes.String}, []arrow.Array{arrowStrings([]string{"a"}, 0, 1)})
	for _, p := range []string{pq, ar} {
		_, err := ReadTokens(context.Background(), p, fakeTokenizer{}, 300, DataOptions{})
		if !errors.Is(err, ErrData) || !strings.Contains(err.Error(), `"text"`) || !strings.Contains(err.Error(), p) {
			t.Errorf("missing column: err = %v, want ErrData naming the file and \"text\"", err)
		}
		_, err = ReadTokens(context.Background(), p, fakeTokenizer{}, 300, DataOptions{TextColumn: "n"})
		if !errors.Is(err, ErrData) || !strings.Contains(err.Error(), `"n"`) {
			t.Errorf("non-string column: err = %v", err)
		}
	}
	bad := writeData(t, "bad.parquet", "PAR1 but not really")
	if _, err := ReadTokens(context.Background(), bad, fakeTokenizer{}, 300, DataOptions{}); !errors.Is(err, ErrData) {
		t.Errorf("broken Parquet: err = %v, want ErrData", err)
	}

	long := writeData(t, "long.txt", "ok\n"+strings.Repeat("y", MaxLineBytes+1)+"\n")
	_, err := ReadTokens(context.Background(), long, fakeTokenizer{}, 300, DataOptions{})
	if !errors.Is(err, ErrTooLarge) || !errors.Is(err, ErrData) || !strings.Contains(err.Error(), "long.txt:2") {
		t.Errorf("long line: err = %v, want ErrTooLarge naming long.txt:2", err)
	}
	// Stopping after the windows needed: the long line is never read.
	got, err := ReadTokens(context.Background(), long, fakeTokenizer{}, 300, DataOptions{MaxTokens: 3})
	if err != nil || !slices.Equal(got, fakeIDs(true, "ok")) {
		t.Errorf("MaxTokens 3: %v, %v", got, err)
	}
	if !testing.Short() {
		exact := writeData(t, "exact.txt", strings.Repeat("z", MaxLineBytes)+"\n")
		if got, err := ReadTokens(context.Background(), exact, fakeTokenizer{}, 300, DataOptions{}); err != nil || len(got) != MaxLineBytes+1 {
			t.Errorf("a line of exactly MaxLineBytes: %d tokens, %v", len(got), err)
		}
	}

	if _, err := os.Stat("/dev/zero"); err == nil {
		_, err := ReadTokens(context.Background(), "/dev/zero", fakeTokenizer{}, 300, DataOptions{})
		if !errors.Is(err, ErrTooLarge) || !strings.Contains(err.Error(), "/dev/zero:1") {
			t.Errorf("/dev/zero: err = %v, want ErrTooLarge at line 1", err)
		}
		if !testing.Short() {
			_, err = ReadTokens(context.Background(), "/dev/zero", fakeTokenizer{}, 300, DataOptions{Protocol: ProtocolJoin})
			if !errors.Is(err, ErrTooLarge) || !strings.Contains(err.Error(), "256 MiB") {
				t.Errorf("/dev/zero join: err = %v, want ErrTooLarge naming 256 MiB", err)
			}
		}
	}
	if _, err := ParseProtocol("windows"); err == nil {
		t.Error("protocol windows accepted")
	}
}

// TestJoinGolden: valid.txt under the join protocol matches golden/join.json (the token
// count exactly, perplexity within 0.1%).
func TestJoinGolden(t *testing.T) {
	b, err := os.ReadFile(sharedPath(t, "golden/join.json"))
	if err != nil {
		t.Fatal(err)
	}
	var g struct {
		Data    string  `json:"data"`
		Model   string  `json:"model"`
		PPL     float64 `json:"ppl"`
		Windows int     `json:"windows"`
		Tokens  int     `json:"tokens"`
	}
	if err := json.Unmarshal(b, &g); err != nil {
		t.Fatal(err)
	}
	m, err := Load(sharedPath(t, g.Model))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := LoadTokenizer(sharedPath(t, g.Model), m.Vocab)
	if err != nil {
		t.Fatal(err)
	}
	stream, err := ReadTokens(context.Background(), sharedPath(t, g.Data), tok, m.Vocab, DataOptions{Protocol: ProtocolJoin})
	if err != nil {
		t.Fatal(err)
	}
	if len(stream) != g.Tokens || stream[0] != tok.DocumentStart() {
		t.Fatalf("join stream: %d tokens starting %d, want %d starting with the document start", len(stream), stream[0], g.Tokens)
	}
	w := Windows(stream, 256, 0)
	if len(w) != g.Windows {
		t.Fatalf("%d windows, want %d", len(w), g.Windows)
	}
	if testing.Short() {
		w = w[:32] // the token count is checked; the full perplexity below
	}
	res, err := m.EvalPerplexity(context.Background(), w, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !testing.Short() && math.Abs(res.PPL/g.PPL-1) > 1e-3 {
		t.Fatalf("join perplexity %.5f, want %.5f within 0.1%%", res.PPL, g.PPL)
	}
	t.Logf("join: %d tokens, %d windows, perplexity %.5f (golden %.5f)", len(stream), len(w), res.PPL, g.PPL)
}

// FuzzColumnarData feeds arbitrary bytes as a Parquet, Arrow IPC file and Arrow IPC stream
// data file (seeded with valid ones): reading must not panic, every failure wraps ErrData
// and every id returned is inside the vocabulary.
func FuzzColumnarData(f *testing.F) {
	dir := f.TempDir()
	seed := func(p string) {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	p := filepath.Join(dir, "t.parquet")
	writeParquetText(f, p, "text", []string{"ab", "", "cd"}, []bool{false, true, false}, 2)
	seed(p)
	p = filepath.Join(dir, "i.parquet")
	writeParquetTokens(f, p, [][]int64{{1, 2}, {}, {3}})
	seed(p)
	for _, stream := range []bool{false, true} {
		p = filepath.Join(dir, fmt.Sprintf("t%v.arrow", stream))
		writeArrow(f, p, stream, arrow.Field{Name: "text", Type: arrow.BinaryTypes.String}, []arrow.Array{arrowStrings([]string{"ab", "cd"}, 0, 2)})
		seed(p)
		p = filepath.Join(dir, fmt.Sprintf("i%v.arrow", stream))
		writeArrow(f, p, stream, arrow.Field{Name: TokenColumn, Type: arrow.ListOf(arrow.PrimitiveTypes.Int32)}, []arrow.Array{arrowTokenLists([][]int64{{1, 2}, {3}})})
		seed(p)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(t.TempDir(), "d")
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		for _, proto := range []Protocol{ProtocolLines, ProtocolJoin} {
			type result struct {
				ids []int
				err error
			}
			done := make(chan result, 1)
			go func() {
				ids, err := ReadTokens(context.Background(), path, fakeTokenizer{}, 300, DataOptions{Protocol: proto})
				done <- result{ids, err}
			}()
			var ids []int
			var err error
			select {
			case r := <-done:
				ids, err = r.ids, r.err
			case <-time.After(20 * time.Second):
				t.Fatalf("%s: reading %d bytes takes over 20 s", proto, len(data))
			}
			if err != nil && !errors.Is(err, ErrData) {
				t.Fatalf("%s: error does not wrap ErrData: %v", proto, err)
			}
			for _, id := range ids {
				if id < 0 || id >= 300 {
					t.Fatalf("%s: id %d outside the vocabulary", proto, id)
				}
			}
		}
	})
}

// TestDocumentStartFallback: a tokenizer without its own BOS takes config.json's
// bos_token_id as the document start; with neither, documents get no start token.
func TestDocumentStartFallback(t *testing.T) {
	m := spModel{modelType: spModelBPE, pieces: []spTestPiece{
		{"<unk>", 0, spUnknown}, {"<s>", 0, spControl}, {"</s>", 0, spControl}, {"▁", -1, 0}, {"a", -2, 0}, {"b", -3, 0},
	}}
	b := m.bytes()
	var tb []byte // a second trainer_spec setting bos_id = -1 (fields merge)
	tb = protowire.AppendTag(tb, 41, protowire.VarintType)
	tb = protowire.AppendVarint(tb, uint64(math.MaxUint64))
	b = protowire.AppendTag(b, 2, protowire.BytesType)
	b = protowire.AppendBytes(b, tb)
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "tokenizer.model"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	data := writeData(t, "d.txt", "ab\n\nba\n")
	tok, err := LoadTokenizer(dir, 0)
	if err != nil {
		t.Fatal(err)
	}
	if tok.BOS() != -1 || tok.DocumentStart() != -1 {
		t.Fatalf("BOS %d, document start %d; want -1, -1", tok.BOS(), tok.DocumentStart())
	}
	ids, err := ReadTokens(context.Background(), data, tok, 6, DataOptions{})
	if err != nil {
		t.Fatal(err)
	}
	want := slices.Concat(tok.Encode("ab"), tok.Encode("ba"))
	if !slices.Equal(ids, want) {
		t.Fatalf("no document start: %v, want %v", ids, want)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(`{"bos_token_id": 2}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if tok, err = LoadTokenizer(dir, 0); err != nil {
		t.Fatal(err)
	}
	if tok.DocumentStart() != 2 {
		t.Fatalf("document start %d, want config.json's 2", tok.DocumentStart())
	}
	ids, err = ReadTokens(context.Background(), data, tok, 6, DataOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if want := slices.Concat([]int{2}, tok.Encode("ab"), []int{2}, tok.Encode("ba")); !slices.Equal(ids, want) {
		t.Fatalf("config document start: %v, want %v", ids, want)
	}
}
