package protocol

import (
	"encoding/json"
	"math"
	"time"
)

// The network student's part of the run protocol (`linearpatch student --nats URL --run ID`).
//
// The coordinator publishes the distillation settings under KeyDistill when the run is
// created (so every student trains with the run's settings, never its own flags). The
// student reads the plan (KeyPlan), the fit (KeyFit), the training-free patch (ObjPatch0)
// and, for every cache shard recorded done (DoneKey), the shard's records from the data
// stream; it saves its checkpoints, with the gradients the students share, in the run's
// gradient store (package studentnet: students.* keys and the LP_<run>_GRAD object store;
// `run`'s in-process student, which works from the run directory, mirrors its checkpoints
// to the object store as ObjStudentCheckpoint), reports progress under KeyStudent, and at
// the end stores the distilled patch (ObjPatchKD) and then its record (KeyStudentResult),
// which is what the coordinator waits for.
const (
	KeyDistill       = "distill"        // the student's TrainConfig, JSON; written by the coordinator
	KeyStudent       = "student"        // StudentStatus, JSON; refreshed by the student
	KeyStudentResult = "student.result" // StudentResult, JSON; written last by the student

	ObjStudentCheckpoint = "student.checkpoint" // the student's latest checkpoint (student.Checkpoint's file format)
	ObjPatchKD           = "patch.kd"           // the distilled patch (d×d float32 little-endian)
)

// Float is a float64 that JSON carries as null when it is NaN or infinite (a loss with no
// validation windows is NaN; encoding/json refuses NaN).
type Float float64

// MarshalJSON writes null for NaN and ±Inf.
func (f Float) MarshalJSON() ([]byte, error) {
	v := float64(f)
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return []byte("null"), nil
	}
	return json.Marshal(v)
}

// UnmarshalJSON reads null as NaN.
func (f *Float) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		*f = Float(math.NaN())
		return nil
	}
	var v float64
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	*f = Float(v)
	return nil
}

// StudentStatus is the student's progress report (KV KeyStudent).
type StudentStatus struct {
	Host         string    `json:"host"`
	PID          int       `json:"pid"`
	State        string    `json:"state"` // waiting (for the fit or a shard), training, done
	Step         int       `json:"step"`
	TotalSteps   int       `json:"total_steps"`
	Loss         Float     `json:"loss"`
	ValidLoss    Float     `json:"valid_loss"`
	TokensPerSec float64   `json:"tokens_per_s"`
	ETASeconds   float64   `json:"eta_seconds"`
	Updated      time.Time `json:"updated"`
}

// StudentPoint is one point of a loss curve.
type StudentPoint struct {
	Step int   `json:"step"`
	Loss Float `json:"loss"`
}

// StudentResult records a finished distillation (KV KeyStudentResult). The patch it
// exported (the last, or with early stopping the best by validation loss) is ObjPatchKD,
// whose SHA-256 is PatchSHA256.
type StudentResult struct {
	Steps          int             `json:"steps"`
	TotalSteps     int             `json:"total_steps"`
	Tokens         int64           `json:"tokens"`
	FinalValid     Float           `json:"final_valid_loss"`
	ElapsedSeconds float64         `json:"seconds"`
	EarlyStopped   bool            `json:"early_stopped"`
	BestStep       int             `json:"best_step"`
	BestValid      Float           `json:"best_valid_loss"`
	Exported       string          `json:"exported"` // "last" or "best"
	TrainLoss      []StudentPoint  `json:"train_loss"`
	ValidLoss      []StudentPoint  `json:"valid_loss"`
	Config         json.RawMessage `json:"config"`
	PatchSHA256    string          `json:"patch_sha256"`
	Host           string          `json:"host"`
}
