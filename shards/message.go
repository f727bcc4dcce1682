package shards

import (
	"fmt"
	"slices"

	"github.com/apache/arrow/go/v17/arrow"
)

// HeaderMargin is the part of a server's max_payload that TokensPerChunk and EncodeStats
// leave free for NATS and JetStream headers (Nats-Msg-Id and the like).
const HeaderMargin = 4096

// EncodeMessage returns rows as one self-contained Arrow IPC stream: the schema (metadata
// = meta) and one uncompressed record batch, one row per Chunk, in the given order. meta
// must pass Validate (SchemaVersion 0 means SchemaVersion). Errors wrap ErrInvalid (a row
// that does not fit meta, ids outside the vocabulary, non-finite values) or ErrOverflow
// (an activation beyond the float16 or bfloat16 range). rows is not modified.
func EncodeMessage(meta Meta, rows []Chunk) ([]byte, error) {
	if err := meta.Validate(); err != nil {
		return nil, err
	}
	meta.SchemaVersion = SchemaVersion
	tokens := 0
	for i := range rows {
		if err := checkChunk(meta, &rows[i]); err != nil {
			return nil, err
		}
		tokens += rows[i].Tokens()
	}
	schema := chunkSchema(meta)
	rec, err := chunkRecord(meta, schema, rows)
	if err != nil {
		return nil, err
	}
	defer rec.Release()
	return writeStream(schema, 2048+len(rows)*64+tokens*bytesPerToken(meta), rec)
}

// DecodeMessage decodes a message written by EncodeMessage, checking its Meta against
// want, and returns its rows (newly allocated). It never panics on bad bytes. Errors wrap:
// ErrVersion for another or no schema version (or top-k encoding); ErrForeign for another
// model fingerprint, run id, cut, dim, k, vocabulary, activation dtype, final-layer
// setting or record kind (the message names the field and both values); ErrCorrupt for
// bytes that are not such a message (bad framing, schema, lengths, ids outside the
// vocabulary, non-finite activations); ErrInvalid when want itself is invalid.
func DecodeMessage(b []byte, want Meta) (rows []Chunk, err error) {
	if err := want.Validate(); err != nil {
		return nil, err
	}
	defer recoverCorrupt(&err)
	rd, err := openStream(b)
	if err != nil {
		return nil, err
	}
	defer rd.Release()
	meta, err := checkSchema(rd.Schema(), want, kindChunks)
	if err != nil {
		return nil, err
	}
	err = readAllRecords(rd, func(rec arrow.Record) error {
		rows, err = decodeChunks(meta, rec, len(rows), rows)
		return err
	})
	if err != nil {
		return nil, err
	}
	return rows, nil
}

// MessageMeta returns the Meta and record kind ("chunks", "stats.windows", "stats.gram")
// of an encoded message without checking them against a run, for routing and logging.
// Errors wrap ErrVersion or ErrCorrupt.
func MessageMeta(b []byte) (meta Meta, kind string, err error) {
	defer recoverCorrupt(&err)
	rd, err := openStream(b)
	if err != nil {
		return Meta{}, "", err
	}
	defer rd.Release()
	return metaFrom(rd.Schema().Metadata())
}

// checkSchema parses the Meta of schema s and checks it against want and kind, and s's
// fields against the schema that Meta implies.
func checkSchema(s *arrow.Schema, want Meta, kind string) (Meta, error) {
	got, gotKind, err := metaFrom(s.Metadata())
	if err != nil {
		return Meta{}, err
	}
	if err := check(got, gotKind, want, kind); err != nil {
		return Meta{}, err
	}
	var expect *arrow.Schema
	switch kind {
	case kindChunks:
		expect = chunkSchema(got)
	case kindStatsWindows:
		expect = statsWindowSchema(got, nil)
	case kindStatsGram:
		expect = statsGramSchema(got, nil)
	}
	if !sameFields(s, expect) {
		return Meta{}, fmt.Errorf("%w: the record's fields are not those of schema version %d: %v", ErrCorrupt, SchemaVersion, s)
	}
	return got, nil
}

// bytesPerToken returns the uncompressed bytes of one token in a chunk record of m.
func bytesPerToken(m Meta) int {
	n := 4 + m.Dim*m.ActDType.Size() + m.K*(2+m.hiWidth())
	if m.Final {
		n += m.Dim * m.ActDType.Size()
	}
	return n
}

// TokensPerChunk returns the largest number of tokens whose single-row message
// (EncodeMessage of one Chunk) is at most maxPayload − HeaderMargin bytes, or 0 when not
// even one token fits. The size is exact up to ≤ 8 bytes of padding per column, which
// the bound reserves. It panics when meta is invalid (a caller bug).
func TokensPerChunk(meta Meta, maxPayload int) int {
	if err := meta.Validate(); err != nil {
		panic(fmt.Sprintf("shards: TokensPerChunk: %v", err))
	}
	meta.SchemaVersion = SchemaVersion
	schema := chunkSchema(meta)
	// A one-row message with no tokens has every header; each token adds its bytes.
	empty := Chunk{Chunks: 1, TokenLo: 0}
	rec, err := chunkRecord(meta, schema, []Chunk{empty})
	if err != nil {
		panic(fmt.Sprintf("shards: TokensPerChunk: %v", err)) // an empty row always encodes
	}
	defer rec.Release()
	b, err := writeStream(schema, 4096, rec)
	if err != nil {
		panic(fmt.Sprintf("shards: TokensPerChunk: %v", err))
	}
	padding := 8 * len(schema.Fields())
	room := maxPayload - HeaderMargin - len(b) - padding
	if room < bytesPerToken(meta) {
		return 0
	}
	return room / bytesPerToken(meta)
}

// SplitWindow cuts whole, one window's row (all of its tokens), into ⌈T/maxTokens⌉ rows of
// balanced sizes (they differ by at most one token, the larger first) numbered 0..Chunks−1,
// with TokenLo offset from whole.TokenLo. The rows share whole's slices. It panics when
// maxTokens < 1, whole has no tokens, or whole's slices do not fit meta's Dim, K and Final
// (a caller bug).
func SplitWindow(meta Meta, whole Chunk, maxTokens int) []Chunk {
	T := whole.Tokens()
	if maxTokens < 1 || T < 1 || len(whole.XCut) != T*meta.Dim || len(whole.TopKIdx) != T*meta.K ||
		len(whole.TopKProb) != T*meta.K || (meta.Final && len(whole.XFinal) != T*meta.Dim) {
		panic(fmt.Sprintf("shards: SplitWindow of %d tokens (x_cut %d, top-k %d/%d, x_final %d) into chunks of %d, dim %d, k %d",
			T, len(whole.XCut), len(whole.TopKIdx), len(whole.TopKProb), len(whole.XFinal), maxTokens, meta.Dim, meta.K))
	}
	n := (T + maxTokens - 1) / maxTokens
	out := make([]Chunk, n)
	lo := 0
	for i := range out {
		size := T / n
		if i < T%n {
			size++
		}
		hi := lo + size
		d, k := meta.Dim, meta.K
		out[i] = Chunk{
			Shard: whole.Shard, Window: whole.Window, Chunk: i, Chunks: n, TokenLo: whole.TokenLo + lo,
			InputIDs: whole.InputIDs[lo:hi:hi],
			XCut:     whole.XCut[lo*d : hi*d : hi*d],
			TopKIdx:  whole.TopKIdx[lo*k : hi*k : hi*k],
			TopKProb: whole.TopKProb[lo*k : hi*k : hi*k],
		}
		if meta.Final {
			out[i].XFinal = whole.XFinal[lo*d : hi*d : hi*d]
		}
		lo = hi
	}
	return out
}

// JoinWindow reassembles one window from its rows, given in any order: they must be
// exactly chunks 0..Chunks−1 of one (shard, window), each starting where the previous one
// ends, and fit meta. The result (Chunk 0 of 1, TokenLo of the first row) is newly
// allocated. Errors wrap ErrInvalid.
func JoinWindow(meta Meta, parts []Chunk) (Chunk, error) {
	if len(parts) == 0 {
		return Chunk{}, fmt.Errorf("%w: join of no rows", ErrInvalid)
	}
	ps := slices.Clone(parts)
	slices.SortFunc(ps, func(a, b Chunk) int { return a.Chunk - b.Chunk })
	first := ps[0]
	out := Chunk{Shard: first.Shard, Window: first.Window, Chunks: 1, TokenLo: first.TokenLo}
	next := first.TokenLo
	for i := range ps {
		p := &ps[i]
		if err := checkChunk(meta, p); err != nil {
			return Chunk{}, err
		}
		if p.Shard != first.Shard || p.Window != first.Window || p.Chunks != len(ps) || p.Chunk != i || p.TokenLo != next {
			return Chunk{}, fmt.Errorf("%w: join of window (shard %d, window %d): row (shard %d, window %d, chunk %d of %d, token_lo %d) is not chunk %d of %d starting at token %d",
				ErrInvalid, first.Shard, first.Window, p.Shard, p.Window, p.Chunk, p.Chunks, p.TokenLo, i, len(ps), next)
		}
		next += p.Tokens()
		out.InputIDs = append(out.InputIDs, p.InputIDs...)
		out.XCut = append(out.XCut, p.XCut...)
		out.TopKIdx = append(out.TopKIdx, p.TopKIdx...)
		out.TopKProb = append(out.TopKProb, p.TopKProb...)
		out.XFinal = append(out.XFinal, p.XFinal...)
	}
	return out, nil
}
