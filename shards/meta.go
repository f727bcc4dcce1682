// Package shards is the data format of the distillation cache: the Arrow schema of the
// teachers' records (hidden states at the cut, top-k targets, optionally the last layer's
// output), their encoding as self-contained Arrow IPC messages small enough for a NATS
// server's max_payload, the shard files (Arrow IPC file format, compressed, written
// atomically, checked by SHA-256), the manifest that lists them, and the Arrow encoding of
// the calibration statistics (patch.Stats). SCHEMA.md documents the format.
//
// Decoders never panic on bad bytes: they return errors wrapping ErrCorrupt, ErrVersion or
// ErrForeign. Encoders return errors wrapping ErrInvalid or ErrOverflow for input they
// cannot represent.
package shards

import (
	"errors"
	"fmt"
	"strconv"

	"github.com/apache/arrow/go/v17/arrow"
)

// SchemaVersion is the version of the record schema this package writes and reads. A
// message or file of another version is rejected with ErrVersion.
const SchemaVersion = 1

var (
	// ErrForeign is wrapped by errors about a message or file of another run: another model
	// fingerprint, run id, cut, width, k, vocabulary, activation dtype or record kind.
	ErrForeign = errors.New("shards: foreign record")
	// ErrVersion is wrapped by errors about a message or file of another (or no) schema version.
	ErrVersion = errors.New("shards: unsupported schema version")
	// ErrCorrupt is wrapped by errors about bytes that do not decode to valid records.
	ErrCorrupt = errors.New("shards: corrupt data")
	// ErrChecksum is wrapped when a shard file's SHA-256 differs from the expected one.
	ErrChecksum = errors.New("shards: checksum mismatch")
	// ErrOverflow is wrapped when an activation does not fit the activation dtype (float16:
	// |x| > 65504). The message names the largest |x| and advises a wider --act-dtype.
	ErrOverflow = errors.New("shards: activation overflows the activation dtype")
	// ErrInvalid is wrapped by errors about input an encoder cannot represent: rows whose
	// shapes do not match the Meta, ids outside the vocabulary, non-finite values, an invalid Meta.
	ErrInvalid = errors.New("shards: invalid input")
	// ErrPayload is wrapped when a maximum payload is too small for one row.
	ErrPayload = errors.New("shards: max payload too small")
	// ErrManifest is wrapped by errors about a malformed manifest.
	ErrManifest = errors.New("shards: bad manifest")
)

// DType is the element type of the hidden-state columns.
type DType string

const (
	Float16  DType = "float16"  // IEEE 754 binary16, Arrow halffloat (the default)
	BFloat16 DType = "bfloat16" // the upper 16 bits of a float32, stored as Arrow uint16
	Float32  DType = "float32"  // Arrow float
)

// ParseDType returns the DType named s ("" gives the default, Float16).
func ParseDType(s string) (DType, error) {
	switch d := DType(s); d {
	case "":
		return Float16, nil
	case Float16, BFloat16, Float32:
		return d, nil
	}
	return "", fmt.Errorf("%w: activation dtype %q (want float16, bfloat16 or float32)", ErrInvalid, s)
}

// Size returns the bytes per element of d, or 0 for an unknown dtype.
func (d DType) Size() int {
	switch d {
	case Float16, BFloat16:
		return 2
	case Float32:
		return 4
	}
	return 0
}

// arrowType returns the Arrow element type of the hidden-state columns.
func (d DType) arrowType() arrow.DataType {
	switch d {
	case Float16:
		return arrow.FixedWidthTypes.Float16
	case BFloat16:
		return arrow.PrimitiveTypes.Uint16
	}
	return arrow.PrimitiveTypes.Float32
}

// Meta describes a run's records; it is carried as the schema metadata of every message
// and shard file, and a decoder rejects records whose Meta differs from the one it wants.
type Meta struct {
	SchemaVersion int    `json:"schema_version"` // 0 in an encoder's input means SchemaVersion
	RunID         string `json:"run_id"`
	Fingerprint   string `json:"fingerprint"` // model.Fingerprint of the teacher
	Start         int    `json:"start"`       // the cut: pruned block [Start, End); X_cut = X_Start; both -1 for statistics
	End           int    `json:"end"`
	Dim           int    `json:"dim"`       // d, the hidden width
	K             int    `json:"k"`         // top-k targets per token; 0: no target columns
	Vocab         int    `json:"vocab"`     // vocabulary size (ids lie in [0, Vocab))
	ActDType      DType  `json:"act_dtype"` // dtype of x_cut and x_final
	Final         bool   `json:"final"`     // x_final (X_L) columns present
}

// maxVocab is the largest vocabulary the top-k gap columns can address (a gap's high part
// is at most uint16).
const maxVocab = 1 << 24

// Validate checks that m describes records this package can write: a known schema version
// (0 or SchemaVersion), a fingerprint, Dim ≥ 1, 1 ≤ Vocab ≤ 2²⁴, 0 ≤ K ≤ Vocab, a known
// dtype, and a cut with 0 ≤ Start < End or Start = End = −1. Errors wrap ErrInvalid.
func (m Meta) Validate() error {
	switch {
	case m.SchemaVersion != 0 && m.SchemaVersion != SchemaVersion:
		return fmt.Errorf("%w: schema version %d (this build writes %d)", ErrInvalid, m.SchemaVersion, SchemaVersion)
	case m.Fingerprint == "":
		return fmt.Errorf("%w: meta without a model fingerprint", ErrInvalid)
	case m.Dim < 1:
		return fmt.Errorf("%w: dim %d", ErrInvalid, m.Dim)
	case m.Vocab < 1 || m.Vocab > maxVocab:
		return fmt.Errorf("%w: vocabulary %d outside 1..%d", ErrInvalid, m.Vocab, maxVocab)
	case m.K < 0 || m.K > m.Vocab:
		return fmt.Errorf("%w: k %d outside 0..vocab %d", ErrInvalid, m.K, m.Vocab)
	case m.ActDType.Size() == 0:
		return fmt.Errorf("%w: activation dtype %q (want float16, bfloat16 or float32)", ErrInvalid, m.ActDType)
	case !(m.Start == -1 && m.End == -1) && !(m.Start >= 0 && m.Start < m.End):
		return fmt.Errorf("%w: cut [%d, %d) (want 0 ≤ start < end, or -1, -1 for statistics)", ErrInvalid, m.Start, m.End)
	}
	return nil
}

// hiWidth returns the bytes of a top-k gap's high part: 1 when vocab ≤ 65536, else 2.
func (m Meta) hiWidth() int {
	if m.Vocab <= 1<<16 {
		return 1
	}
	return 2
}

// Record kinds, the value of metadata key keyKind.
const (
	kindChunks       = "chunks"
	kindStatsWindows = "stats.windows"
	kindStatsGram    = "stats.gram"
)

// Schema metadata keys.
const (
	keyVersion     = "linearpatch.schema_version"
	keyKind        = "linearpatch.kind"
	keyRunID       = "linearpatch.run_id"
	keyFingerprint = "linearpatch.fingerprint"
	keyStart       = "linearpatch.start"
	keyEnd         = "linearpatch.end"
	keyDim         = "linearpatch.dim"
	keyK           = "linearpatch.k"
	keyVocab       = "linearpatch.vocab"
	keyActDType    = "linearpatch.act_dtype"
	keyFinal       = "linearpatch.final"
	keyTopK        = "linearpatch.topk_encoding"
	keyDTypeField  = "linearpatch.dtype" // field metadata of x_cut and x_final

	// topKEncoding names the top-k quantizer (see SCHEMA.md); a change of quantizer is a
	// change of schema version.
	topKEncoding = "id-gap-bytes+sqrt-p-u8"
)

// metadata returns the schema metadata of m for records of the given kind, extra pairs appended.
func (m Meta) metadata(kind string, extra ...string) arrow.Metadata {
	keys := []string{keyVersion, keyKind, keyRunID, keyFingerprint, keyStart, keyEnd, keyDim, keyK, keyVocab, keyActDType, keyFinal, keyTopK}
	vals := []string{
		strconv.Itoa(SchemaVersion), kind, m.RunID, m.Fingerprint,
		strconv.Itoa(m.Start), strconv.Itoa(m.End), strconv.Itoa(m.Dim), strconv.Itoa(m.K),
		strconv.Itoa(m.Vocab), string(m.ActDType), strconv.FormatBool(m.Final), topKEncoding,
	}
	for i := 0; i+1 < len(extra); i += 2 {
		keys = append(keys, extra[i])
		vals = append(vals, extra[i+1])
	}
	return arrow.NewMetadata(keys, vals)
}

// metaFrom parses the Meta and kind of schema metadata md. A missing or other schema
// version wraps ErrVersion; other missing or malformed keys wrap ErrCorrupt.
func metaFrom(md arrow.Metadata) (Meta, string, error) {
	get := func(k string) (string, bool) {
		i := md.FindKey(k)
		if i < 0 {
			return "", false
		}
		return md.Values()[i], true
	}
	v, ok := get(keyVersion)
	if !ok {
		return Meta{}, "", fmt.Errorf("%w: no %s metadata (not a linearpatch record)", ErrVersion, keyVersion)
	}
	ver, err := strconv.Atoi(v)
	if err != nil || ver != SchemaVersion {
		return Meta{}, "", fmt.Errorf("%w: schema version %q, this build reads %d", ErrVersion, v, SchemaVersion)
	}
	m := Meta{SchemaVersion: ver}
	var kind, final, enc string
	strs := []struct {
		key string
		dst *string
	}{{keyKind, &kind}, {keyRunID, &m.RunID}, {keyFingerprint, &m.Fingerprint}, {keyActDType, (*string)(&m.ActDType)}, {keyFinal, &final}, {keyTopK, &enc}}
	for _, s := range strs {
		if *s.dst, ok = get(s.key); !ok {
			return Meta{}, "", fmt.Errorf("%w: metadata lacks %s", ErrCorrupt, s.key)
		}
	}
	ints := []struct {
		key string
		dst *int
	}{{keyStart, &m.Start}, {keyEnd, &m.End}, {keyDim, &m.Dim}, {keyK, &m.K}, {keyVocab, &m.Vocab}}
	for _, s := range ints {
		v, ok := get(s.key)
		if !ok {
			return Meta{}, "", fmt.Errorf("%w: metadata lacks %s", ErrCorrupt, s.key)
		}
		if *s.dst, err = strconv.Atoi(v); err != nil {
			return Meta{}, "", fmt.Errorf("%w: metadata %s = %q", ErrCorrupt, s.key, v)
		}
	}
	if m.Final, err = strconv.ParseBool(final); err != nil {
		return Meta{}, "", fmt.Errorf("%w: metadata %s = %q", ErrCorrupt, keyFinal, final)
	}
	if enc != topKEncoding {
		return Meta{}, "", fmt.Errorf("%w: top-k encoding %q, this build reads %q", ErrVersion, enc, topKEncoding)
	}
	if err := m.Validate(); err != nil {
		return Meta{}, "", fmt.Errorf("%w: metadata: %v", ErrCorrupt, err)
	}
	return m, kind, nil
}

// check returns an error wrapping ErrForeign naming the first field in which the decoded
// got (of kind gotKind) differs from want (of kind wantKind).
func check(got Meta, gotKind string, want Meta, wantKind string) error {
	diff := func(field string, g, w any) error {
		return fmt.Errorf("%w: %s %v, want %v", ErrForeign, field, g, w)
	}
	switch {
	case gotKind != wantKind:
		return diff("record kind", gotKind, wantKind)
	case got.Fingerprint != want.Fingerprint:
		return diff("model fingerprint", got.Fingerprint, want.Fingerprint)
	case got.RunID != want.RunID:
		return diff("run id", strconv.Quote(got.RunID), strconv.Quote(want.RunID))
	case got.Start != want.Start || got.End != want.End:
		return diff("cut", fmt.Sprintf("[%d, %d)", got.Start, got.End), fmt.Sprintf("[%d, %d)", want.Start, want.End))
	case got.Dim != want.Dim:
		return diff("dim", got.Dim, want.Dim)
	case got.K != want.K:
		return diff("k", got.K, want.K)
	case got.Vocab != want.Vocab:
		return diff("vocabulary", got.Vocab, want.Vocab)
	case got.ActDType != want.ActDType:
		return diff("activation dtype", got.ActDType, want.ActDType)
	case got.Final != want.Final:
		return diff("final-layer columns", got.Final, want.Final)
	}
	return nil
}
