package student

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	binenc "encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Errors about checkpoints.
var (
	// ErrNoCheckpoint: the store holds no checkpoint (a fresh start).
	ErrNoCheckpoint = errors.New("student: no checkpoint")
	// ErrCheckpointCorrupt: a stored checkpoint does not decode (bad magic, checksum, shapes).
	ErrCheckpointCorrupt = errors.New("student: corrupt checkpoint")
	// ErrCheckpointMismatch: a checkpoint of another run (another fingerprint: settings, data,
	// model, P0, build), or the data changed under it. The message names what differs.
	ErrCheckpointMismatch = errors.New("student: checkpoint of another run")
	// ErrCheckpointVersion: a checkpoint written by an older linearpatch, whose steps
	// cannot be continued bit-identically (the message says why); start over.
	ErrCheckpointVersion = errors.New("student: checkpoint of an older version")
)

// Checkpoint is the trainer's whole state at a step boundary: resuming from it gives the
// same final P, bit for bit, as never stopping. The data order needs no RNG state: the
// order of epoch e is a pure function of (plan, seed, e) (ShardData.Order), and the position
// in it follows from Step.
type Checkpoint struct {
	Step   int // optimizer steps done
	Epoch  int // Step / steps per epoch (informative; Step decides)
	Cursor int // windows of epoch Epoch's order consumed (informative; Step decides)

	P        []float32 // d×d patch after Step steps
	M, V     []float64 // AdamW moments
	AdamStep int       // AdamW updates done (= Step)

	Fingerprint string      // Identity.Hash()
	Identity    Fingerprint // what the hash covers, to name what differs on a mismatch

	TrainLoss []CurvePoint // the loss of every step
	ValidLoss []CurvePoint // every validation pass (step 0: P0)
	BestValid float64      // lowest validation loss so far (+Inf before any)
	BestStep  int          // step of BestValid
	BestP     []float32    // P at BestStep (nil without validation)

	// ShardSHA256 holds the SHA-256 of every shard file used so far; on resume a shard whose
	// file changed is ErrCheckpointMismatch (the results would not be reproducible).
	ShardSHA256 map[int]string

	Elapsed time.Duration // training time summed over sessions
	Done    bool          // the run finished (all steps, or early stop)
}

// clone returns a deep copy of c.
func (c *Checkpoint) clone() *Checkpoint {
	out := *c
	out.P = append([]float32(nil), c.P...)
	out.M = append([]float64(nil), c.M...)
	out.V = append([]float64(nil), c.V...)
	out.BestP = append([]float32(nil), c.BestP...)
	if c.BestP == nil {
		out.BestP = nil
	}
	out.TrainLoss = append([]CurvePoint(nil), c.TrainLoss...)
	out.ValidLoss = append([]CurvePoint(nil), c.ValidLoss...)
	out.ShardSHA256 = make(map[int]string, len(c.ShardSHA256))
	for k, v := range c.ShardSHA256 {
		out.ShardSHA256[k] = v
	}
	out.Identity = c.Identity.clone()
	return &out
}

// CheckpointStore keeps the latest checkpoint of one run.
//
// Contract:
//   - Save stores c atomically: after it returns nil, Load returns c; after it returns an
//     error (or the process dies during it), Load returns the previous checkpoint, whole.
//     Save does not keep c or its slices after it returns.
//   - Load returns a checkpoint the caller owns, ErrNoCheckpoint when none was saved, an
//     error wrapping ErrCheckpointCorrupt when the stored bytes are damaged (never a partial
//     checkpoint, and never ErrNoCheckpoint for a damaged one), or one wrapping
//     ErrCheckpointVersion for a checkpoint of an older format.
//   - Both honour ctx where they block; neither is required to be safe for concurrent use.
type CheckpointStore interface {
	Save(ctx context.Context, c *Checkpoint) error
	Load(ctx context.Context) (*Checkpoint, error)
}

// CheckpointFile is the file name of a FileCheckpointStore's checkpoint.
const CheckpointFile = "checkpoint.bin"

// FileCheckpointStore keeps the checkpoint in dir/checkpoint.bin. Save writes a temporary
// file in dir (.checkpoint.bin.tmp-*), fsyncs it, renames it over checkpoint.bin and fsyncs
// dir. Load never reads a temporary file; the temporary files a killed process left behind
// are removed by the next successful Save. One store per directory, one process at a time.
//
// File format (little-endian): the 8 bytes "LPCKPT02"; a uint32 n and n bytes of JSON
// (the scalar fields, the fingerprint, the shard checksums and the list of arrays with
// their element types and lengths); the arrays' raw values in that order (P, BestP as
// float32; M, V, the curves' losses as float64; the curves' steps as int64); then the
// SHA-256 of everything before it. Load checks the checksum before decoding anything.
type FileCheckpointStore struct {
	dir string
	// wrap, when set (tests), wraps the temporary file's writer during Save.
	wrap func(io.Writer) io.Writer
}

// NewFileCheckpointStore returns a store in dir (created on the first Save).
func NewFileCheckpointStore(dir string) *FileCheckpointStore { return &FileCheckpointStore{dir: dir} }

// Path returns the checkpoint file's path.
func (s *FileCheckpointStore) Path() string { return filepath.Join(s.dir, CheckpointFile) }

// Save writes c atomically (see the type's comment). Errors are I/O errors, or ctx's.
func (s *FileCheckpointStore) Save(ctx context.Context, c *Checkpoint) (err error) {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := os.MkdirAll(s.dir, 0o755); err != nil {
		return fmt.Errorf("student: save checkpoint: %w", err)
	}
	f, err := os.CreateTemp(s.dir, "."+CheckpointFile+".tmp-*")
	if err != nil {
		return fmt.Errorf("student: save checkpoint: %w", err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	var w io.Writer = f
	if s.wrap != nil {
		w = s.wrap(f)
	}
	bw := bufio.NewWriterSize(w, 1<<20)
	if err = encodeCheckpoint(bw, c); err != nil {
		return fmt.Errorf("student: save checkpoint: %w", err)
	}
	if err = bw.Flush(); err != nil {
		return fmt.Errorf("student: save checkpoint: %w", err)
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("student: save checkpoint: sync: %w", err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("student: save checkpoint: %w", err)
	}
	if err = os.Rename(tmp, s.Path()); err != nil {
		return fmt.Errorf("student: save checkpoint: %w", err)
	}
	if d, derr := os.Open(s.dir); derr == nil { // make the rename durable
		derr = d.Sync()
		d.Close()
		if derr != nil {
			return fmt.Errorf("student: save checkpoint: sync %s: %w", s.dir, derr)
		}
	}
	if ents, derr := os.ReadDir(s.dir); derr == nil {
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), "."+CheckpointFile+".tmp-") {
				os.Remove(filepath.Join(s.dir, e.Name())) // left by a killed process
			}
		}
	}
	return nil
}

// Load reads the checkpoint (see CheckpointStore).
func (s *FileCheckpointStore) Load(ctx context.Context) (*Checkpoint, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(s.Path())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, ErrNoCheckpoint
	}
	if err != nil {
		return nil, fmt.Errorf("student: load checkpoint: %w", err)
	}
	c, err := decodeCheckpoint(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", s.Path(), err)
	}
	return c, nil
}

// checkpointMagic names the format version. 02: the state of a run whose step gradient is
// the sum of per-window gradients in window order (01: a step's windows went through one
// graph together, so a resumed 01 run would change arithmetic mid-run; it is refused).
const checkpointMagic = "LPCKPT02"

// oldCheckpointMagics are the earlier versions Load recognizes, to refuse them by name.
var oldCheckpointMagics = map[string]string{
	"LPCKPT01": "its steps ran a batch's windows through one graph; steps now sum per-window gradients in window order, so it cannot be continued bit-identically",
}

// ckptHeader is the JSON part of the file.
type ckptHeader struct {
	Step        int            `json:"step"`
	Epoch       int            `json:"epoch"`
	Cursor      int            `json:"cursor"`
	AdamStep    int            `json:"adam_step"`
	Fingerprint string         `json:"fingerprint"`
	Identity    Fingerprint    `json:"identity"`
	BestStep    int            `json:"best_step"`
	ShardSHA256 map[int]string `json:"shard_sha256"`
	ElapsedNS   int64          `json:"elapsed_ns"`
	Done        bool           `json:"done"`
	Arrays      []ckptArray    `json:"arrays"`
}

type ckptArray struct {
	Name string `json:"name"`
	Type string `json:"type"` // f32, f64, i64
	Len  int    `json:"len"`
	Nil  bool   `json:"nil,omitempty"`
}

// The arrays, in file order.
var ckptArrays = []struct{ name, typ string }{
	{"p", "f32"}, {"best_p", "f32"}, {"m", "f64"}, {"v", "f64"},
	{"train_step", "i64"}, {"train_loss", "f64"}, {"valid_step", "i64"}, {"valid_loss", "f64"},
	{"best_valid", "f64"},
}

func elemSize(typ string) int {
	if typ == "f32" {
		return 4
	}
	return 8
}

type hashWriter struct {
	w io.Writer
	h hash.Hash
}

func (h *hashWriter) Write(p []byte) (int, error) {
	n, err := h.w.Write(p)
	h.h.Write(p[:n])
	return n, err
}

func encodeCheckpoint(w io.Writer, c *Checkpoint) error {
	ts, tl := curveCols(c.TrainLoss)
	vs, vl := curveCols(c.ValidLoss)
	f32 := map[string][]float32{"p": c.P, "best_p": c.BestP}
	f64 := map[string][]float64{"m": c.M, "v": c.V, "train_loss": tl, "valid_loss": vl, "best_valid": {c.BestValid}}
	i64 := map[string][]int64{"train_step": ts, "valid_step": vs}
	h := ckptHeader{Step: c.Step, Epoch: c.Epoch, Cursor: c.Cursor, AdamStep: c.AdamStep,
		Fingerprint: c.Fingerprint, Identity: c.Identity, BestStep: c.BestStep,
		ShardSHA256: c.ShardSHA256, ElapsedNS: int64(c.Elapsed), Done: c.Done}
	for _, a := range ckptArrays {
		n, isNil := 0, false
		switch a.typ {
		case "f32":
			n, isNil = len(f32[a.name]), f32[a.name] == nil
		case "f64":
			n = len(f64[a.name])
		case "i64":
			n = len(i64[a.name])
		}
		h.Arrays = append(h.Arrays, ckptArray{Name: a.name, Type: a.typ, Len: n, Nil: isNil})
	}
	js, err := json.Marshal(h)
	if err != nil {
		return err
	}
	hw := &hashWriter{w: w, h: sha256.New()}
	var buf [8]byte
	io.WriteString(hw, checkpointMagic)
	binenc.LittleEndian.PutUint32(buf[:4], uint32(len(js)))
	hw.Write(buf[:4])
	hw.Write(js)
	chunk := make([]byte, 0, 1<<16)
	flush := func() error {
		_, err := hw.Write(chunk)
		chunk = chunk[:0]
		return err
	}
	for _, a := range ckptArrays {
		switch a.typ {
		case "f32":
			for _, v := range f32[a.name] {
				chunk = binenc.LittleEndian.AppendUint32(chunk, math.Float32bits(v))
				if len(chunk) >= 1<<16 {
					if err := flush(); err != nil {
						return err
					}
				}
			}
		case "f64":
			for _, v := range f64[a.name] {
				chunk = binenc.LittleEndian.AppendUint64(chunk, math.Float64bits(v))
				if len(chunk) >= 1<<16 {
					if err := flush(); err != nil {
						return err
					}
				}
			}
		case "i64":
			for _, v := range i64[a.name] {
				chunk = binenc.LittleEndian.AppendUint64(chunk, uint64(v))
				if len(chunk) >= 1<<16 {
					if err := flush(); err != nil {
						return err
					}
				}
			}
		}
	}
	if err := flush(); err != nil {
		return err
	}
	_, err = w.Write(hw.h.Sum(nil))
	return err
}

func curveCols(c []CurvePoint) ([]int64, []float64) {
	s, l := make([]int64, len(c)), make([]float64, len(c))
	for i, p := range c {
		s[i], l[i] = int64(p.Step), p.Loss
	}
	return s, l
}

// decodeCheckpoint parses a checkpoint file. Errors wrap ErrCheckpointCorrupt or
// ErrCheckpointVersion.
func decodeCheckpoint(b []byte) (*Checkpoint, error) {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrCheckpointCorrupt, fmt.Sprintf(format, a...))
	}
	if len(b) >= len(checkpointMagic) {
		if why, ok := oldCheckpointMagics[string(b[:len(checkpointMagic)])]; ok {
			return nil, fmt.Errorf("%w: format %s: %s; start over without resume", ErrCheckpointVersion, b[:len(checkpointMagic)], why)
		}
	}
	if len(b) < len(checkpointMagic)+4+sha256.Size || string(b[:len(checkpointMagic)]) != checkpointMagic {
		return nil, bad("not a checkpoint file (%d bytes, no %q magic)", len(b), checkpointMagic)
	}
	body, sum := b[:len(b)-sha256.Size], b[len(b)-sha256.Size:]
	if got := sha256.Sum256(body); !bytes.Equal(got[:], sum) {
		return nil, bad("checksum mismatch (a truncated or damaged file)")
	}
	rest := body[len(checkpointMagic):]
	n := int(binenc.LittleEndian.Uint32(rest))
	rest = rest[4:]
	if n > len(rest) {
		return nil, bad("header of %d bytes in %d", n, len(rest))
	}
	var h ckptHeader
	dec := json.NewDecoder(bytes.NewReader(rest[:n]))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&h); err != nil {
		return nil, bad("header: %v", err)
	}
	rest = rest[n:]
	if len(h.Arrays) != len(ckptArrays) {
		return nil, bad("%d arrays, want %d", len(h.Arrays), len(ckptArrays))
	}
	total := 0
	for i, a := range h.Arrays {
		want := ckptArrays[i]
		if a.Name != want.name || a.Type != want.typ || a.Len < 0 || a.Len > len(rest)/elemSize(a.Type) {
			return nil, bad("array %d: %+v", i, a)
		}
		total += a.Len * elemSize(a.Type)
	}
	if total != len(rest) {
		return nil, bad("arrays need %d bytes, file has %d", total, len(rest))
	}
	c := &Checkpoint{Step: h.Step, Epoch: h.Epoch, Cursor: h.Cursor, AdamStep: h.AdamStep,
		Fingerprint: h.Fingerprint, Identity: h.Identity, BestStep: h.BestStep,
		ShardSHA256: h.ShardSHA256, Elapsed: time.Duration(h.ElapsedNS), Done: h.Done}
	if c.ShardSHA256 == nil {
		c.ShardSHA256 = map[int]string{}
	}
	var f32 = map[string][]float32{}
	var f64 = map[string][]float64{}
	var i64 = map[string][]int64{}
	for _, a := range h.Arrays {
		sz := elemSize(a.Type)
		raw := rest[:a.Len*sz]
		rest = rest[a.Len*sz:]
		switch a.Type {
		case "f32":
			if a.Nil {
				if a.Len != 0 {
					return nil, bad("array %s: nil with %d values", a.Name, a.Len)
				}
				continue
			}
			v := make([]float32, a.Len)
			for i := range v {
				v[i] = math.Float32frombits(binenc.LittleEndian.Uint32(raw[4*i:]))
			}
			f32[a.Name] = v
		case "f64":
			v := make([]float64, a.Len)
			for i := range v {
				v[i] = math.Float64frombits(binenc.LittleEndian.Uint64(raw[8*i:]))
			}
			f64[a.Name] = v
		case "i64":
			v := make([]int64, a.Len)
			for i := range v {
				v[i] = int64(binenc.LittleEndian.Uint64(raw[8*i:]))
			}
			i64[a.Name] = v
		}
	}
	c.P, c.BestP, c.M, c.V = f32["p"], f32["best_p"], f64["m"], f64["v"]
	if len(f64["best_valid"]) != 1 {
		return nil, bad("best_valid holds %d values", len(f64["best_valid"]))
	}
	c.BestValid = f64["best_valid"][0]
	var err error
	if c.TrainLoss, err = curveFrom(i64["train_step"], f64["train_loss"]); err != nil {
		return nil, bad("train curve: %v", err)
	}
	if c.ValidLoss, err = curveFrom(i64["valid_step"], f64["valid_loss"]); err != nil {
		return nil, bad("validation curve: %v", err)
	}
	switch {
	case len(c.P) == 0 || len(c.M) != len(c.P) || len(c.V) != len(c.P):
		return nil, bad("P has %d values, moments %d and %d", len(c.P), len(c.M), len(c.V))
	case c.BestP != nil && len(c.BestP) != len(c.P):
		return nil, bad("best P has %d values, P %d", len(c.BestP), len(c.P))
	case c.Step < 0 || c.AdamStep < 0 || c.Epoch < 0 || c.Cursor < 0 || c.BestStep < 0 || c.BestStep > c.Step:
		return nil, bad("negative or inconsistent counters (step %d, adam %d, best %d)", c.Step, c.AdamStep, c.BestStep)
	}
	return c, nil
}

func curveFrom(steps []int64, loss []float64) ([]CurvePoint, error) {
	if len(steps) != len(loss) {
		return nil, fmt.Errorf("%d steps and %d losses", len(steps), len(loss))
	}
	out := make([]CurvePoint, len(steps))
	for i := range out {
		if steps[i] < 0 || steps[i] > math.MaxInt32*int64(1<<20) {
			return nil, fmt.Errorf("step %d", steps[i])
		}
		out[i] = CurvePoint{Step: int(steps[i]), Loss: loss[i]}
	}
	return out, nil
}

// MarshalBinary encodes c in the checkpoint file format (for stores other than files).
func (c *Checkpoint) MarshalBinary() ([]byte, error) {
	var b bytes.Buffer
	if err := encodeCheckpoint(&b, c); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// UnmarshalCheckpoint decodes the checkpoint file format. Errors wrap ErrCheckpointCorrupt
// or ErrCheckpointVersion.
func UnmarshalCheckpoint(b []byte) (*Checkpoint, error) { return decodeCheckpoint(b) }
