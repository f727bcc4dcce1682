package protocol

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"strings"

	"linearpatch/shards"
)

// The run's state in its JetStream KV bucket and object store (namespaced by run id, see
// worker.Names). Keys:
const (
	KeyPlan  = "plan"  // Plan, JSON; written once when the run is created
	KeyPhase = "phase" // the current Phase
	KeyFit   = "fit"   // FitResult, JSON; written when the stats phase is fitted
	// "shard.<phase>.<id>": coordinator.ShardState, JSON, written by the coordinator (see coordinator.ShardKey)
	// "done.<phase>.<id>": ShardDone, JSON, written by whoever made the shard durable
	// "teacher.<name>": coordinator.TeacherStatus, JSON, refreshed by each teacher
	// "redo.<phase>.<id>": Redo, JSON, written by the consumer that rejected a record
)

// RedoKey is the KV key under which a consumer asks for a shard to be recomputed.
func RedoKey(ph Phase, id int) string { return fmt.Sprintf("redo.%s.%06d", ph, id) }

// Redo asks the coordinator to recompute a shard: a record of it was rejected, so the
// record it stands in for may never arrive under its message id (junk published first
// under a real record's id makes the stream drop the real one as a duplicate).
type Redo struct {
	Phase            Phase  `json:"phase"`
	Shard            int    `json:"shard"`
	Subject          string `json:"subject"`
	Reason           string `json:"reason"`
	ClaimedPublisher string `json:"claimed_publisher"`
}

// Objects in the run's object store.
const (
	ObjCalibTokens = "tokens.calib" // the calibration token stream, int32 little-endian
	ObjTrainTokens = "tokens.train" // the training token stream, int32 little-endian
	ObjPatch0      = "patch0"       // the training-free patch P (d×d float32 little-endian); absent for none
)

// DoneKey is the KV key under which a shard's completion is recorded.
func DoneKey(ph Phase, id int) string { return fmt.Sprintf("done.%s.%06d", ph, id) }

// DoneKeys is the KV key filter matching the completion keys of every shard of ph.
func DoneKeys(ph Phase) string { return "done." + string(ph) + ".*" }

// ParseDoneKey returns the phase and shard id of a DoneKey; ok is false for any other key.
func ParseDoneKey(key string) (ph Phase, id int, ok bool) {
	rest, found := strings.CutPrefix(key, "done.")
	if !found {
		return "", 0, false
	}
	phase, num, found := strings.Cut(rest, ".")
	if !found {
		return "", 0, false
	}
	id, err := strconv.Atoi(num)
	if err != nil || id < 0 {
		return "", 0, false
	}
	return Phase(phase), id, true
}

// TeacherKey is the KV key of a teacher's status.
func TeacherKey(name string) string { return "teacher." + name }

// Task is the payload of a shard task.
type Task struct {
	Phase   Phase `json:"phase"`
	Shard   int   `json:"shard"`
	Split   Split `json:"split"`
	First   int   `json:"first"`   // first window's index in its stream
	Windows int   `json:"windows"` // number of windows
	Start   int   `json:"start"`   // cache phase: the cut [Start, End)
	End     int   `json:"end"`
	// Attempt is "" for a shard's first task and a fresh random nonce for each task
	// republished after a rejected record: teachers put it into their messages' ids.
	Attempt string `json:"attempt,omitempty"`
}

// TaskID is the stable id (Nats-Msg-Id) of a shard's task.
func TaskID(ph Phase, shard int) string { return fmt.Sprintf("%s-%06d", ph, shard) }

// DoneMarker closes a shard's records on the data stream: the teacher publishes it after
// all of the shard's records, so a consumer knows how many to expect.
type DoneMarker struct {
	Phase    Phase  `json:"phase"`
	Shard    int    `json:"shard"`
	Messages int    `json:"messages"` // data messages of the shard (stats parts or window chunks)
	Tokens   int64  `json:"tokens"`
	Teacher  string `json:"teacher"`
	Attempt  string `json:"attempt,omitempty"` // the task's Attempt
}

// ShardDone records a durable, verified shard (KV "done.<phase>.<id>").
type ShardDone struct {
	Phase  Phase  `json:"phase"`
	Shard  int    `json:"shard"`
	Rows   int    `json:"rows"`
	Tokens int64  `json:"tokens"`
	Bytes  int64  `json:"bytes"`
	SHA256 string `json:"sha256"`
	File   string `json:"file"`
	Source string `json:"source"` // the teacher that computed it
}

// Progress is a teacher's progress report (core NATS subject "lp.<run>.progress").
type Progress struct {
	Teacher      string  `json:"teacher"`
	Phase        Phase   `json:"phase"`
	Shard        int     `json:"shard"`
	Tokens       int64   `json:"tokens"`       // tokens of this shard done so far
	TokensPerSec float64 `json:"tokens_per_s"` // the teacher's recent throughput
	TotalTokens  int64   `json:"total_tokens"` // tokens done by this teacher since it started
	Threads      int     `json:"threads"`      // compute threads
	Host         string  `json:"host,omitempty"`
}

// FitResult is the training-free patch fitted after the stats phase (KV "fit").
type FitResult struct {
	Start  int             `json:"start"`
	End    int             `json:"end"`
	Method string          `json:"method"`
	Cosine []float64       `json:"cosine"`
	Scale  []float64       `json:"scale,omitempty"`
	Tokens int64           `json:"tokens"`
	HasP   bool            `json:"has_patch"`
	Scores json.RawMessage `json:"scores,omitempty"`
}

// EncodeInt32s encodes token ids as int32 little-endian bytes.
func EncodeInt32s(ids []int) []byte {
	b := make([]byte, 4*len(ids))
	for i, v := range ids {
		binary.LittleEndian.PutUint32(b[4*i:], uint32(int32(v)))
	}
	return b
}

// DecodeInt32s decodes int32 little-endian bytes.
func DecodeInt32s(b []byte) ([]int, error) {
	if len(b)%4 != 0 {
		return nil, fmt.Errorf("protocol: token stream of %d bytes is not int32s", len(b))
	}
	ids := make([]int, len(b)/4)
	for i := range ids {
		ids[i] = int(int32(binary.LittleEndian.Uint32(b[4*i:])))
	}
	return ids, nil
}

// EncodeFloat32s encodes float32 values little-endian.
func EncodeFloat32s(v []float32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return b
}

// DecodeFloat32s decodes float32 little-endian bytes.
func DecodeFloat32s(b []byte) ([]float32, error) {
	if len(b)%4 != 0 {
		return nil, fmt.Errorf("protocol: %d bytes are not float32s", len(b))
	}
	v := make([]float32, len(b)/4)
	for i := range v {
		v[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return v, nil
}

// StatsMeta is the record metadata of a run's stats phase.
func StatsMeta(p *Plan, dim, vocab int) shards.Meta {
	return shards.Meta{SchemaVersion: shards.SchemaVersion, RunID: p.RunID, Fingerprint: p.Settings.Fingerprint,
		Start: -1, End: -1, Dim: dim, Vocab: vocab, ActDType: shards.Float32}
}

// TeacherConsumer is the durable name of the teachers' shared task consumer.
const TeacherConsumer = "teachers"

// ProgressSubject is the core-NATS subject of teachers' progress reports.
func ProgressSubject(run string) string { return "lp." + run + ".progress" }
