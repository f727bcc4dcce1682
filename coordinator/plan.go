// Package coordinator plans a run, hands out shards, aggregates the calibration statistics,
// tracks progress and resumes after a restart.
//
// Its decisions live in a deterministic core (Core: events in, actions out, no clock, no
// I/O); the process that drives it (Coordinator) performs the actions over NATS JetStream
// and feeds back what happened.
package coordinator

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
)

// ErrPlan is wrapped by errors about an invalid or mismatched run plan.
var ErrPlan = errors.New("coordinator: invalid plan")

// Phase names a stage of a run.
type Phase string

const (
	PhaseStats   Phase = "stats"   // calibration statistics, merged into the training-free patch
	PhaseCache   Phase = "cache"   // teacher activations for distillation
	PhaseStudent Phase = "student" // offline distillation of the patch
	PhaseDone    Phase = "done"
)

// Settings are the user's choices that define a run; equal settings give the same plan
// and the same run id, so re-running a command resumes its run.
type Settings struct {
	Model        string  `json:"model"`
	Fingerprint  string  `json:"fingerprint"`
	Calib        string  `json:"calib"`
	CalibWindows int     `json:"calib_windows"`
	Train        string  `json:"train"`
	SeqLen       int     `json:"seq_len"`
	NumPrune     int     `json:"num_prune"`
	Method       string  `json:"method"`
	Ridge        float64 `json:"ridge"`
	AllowEdges   bool    `json:"allow_edges"`
	ShardWindows int     `json:"shard_windows"`
	TopK         int     `json:"top_k"`
	ActDType     string  `json:"act_dtype"`
	CacheFinal   bool    `json:"cache_final"`
	ValidFrac    float64 `json:"valid_frac"`
}

// Validate checks the settings.
func (s Settings) Validate() error {
	switch {
	case s.Model == "" || s.Fingerprint == "":
		return fmt.Errorf("%w: model and its fingerprint are required", ErrPlan)
	case s.Calib == "":
		return fmt.Errorf("%w: calibration data is required", ErrPlan)
	case s.CalibWindows < 1 || s.SeqLen < 2 || s.NumPrune < 1 || s.ShardWindows < 1 || s.TopK < 1:
		return fmt.Errorf("%w: calib-windows, num-prune, shard-windows and top-k must be ≥ 1 and seq-len ≥ 2", ErrPlan)
	case s.ValidFrac < 0 || s.ValidFrac >= 1:
		return fmt.Errorf("%w: validation fraction %v outside [0, 1)", ErrPlan, s.ValidFrac)
	}
	return nil
}

// RunID derives a run id from the settings: "r" and 12 hex digits of their SHA-256.
func (s Settings) RunID() string {
	b, _ := json.Marshal(s)
	h := sha256.Sum256(b)
	return "r" + hex.EncodeToString(h[:6])
}

// Split says what a shard's windows are for.
type Split string

const (
	SplitCalib Split = "calib" // stats phase
	SplitTrain Split = "train" // distillation
	SplitValid Split = "valid" // held-out validation
)

// Shard is a contiguous range of windows of one token stream.
type Shard struct {
	ID      int   `json:"id"`      // unique within its phase, in plan order
	Split   Split `json:"split"`   // calib, train or valid
	First   int   `json:"first"`   // index of its first window in its stream
	Windows int   `json:"windows"` // number of windows
}

// Plan is a run: its settings, its windows and its shards, in the order the student
// consumes them.
type Plan struct {
	RunID        string   `json:"run_id"`
	Settings     Settings `json:"settings"`
	CalibWindows int      `json:"calib_windows"` // windows in the stats phase
	TrainWindows int      `json:"train_windows"` // windows the student trains on
	ValidWindows int      `json:"valid_windows"` // held-out windows
	Stats        []Shard  `json:"stats"`         // stats-phase shards over the calibration stream
	Cache        []Shard  `json:"cache"`         // cache-phase shards: train shards then valid shards
}

// NewPlan cuts calibWindows and trainWindows (the numbers of windows in the calibration and
// training streams) into shards of at most ShardWindows windows. The stats phase covers the
// first min(CalibWindows, calibWindows) calibration windows; the cache phase the first
// floor((1−ValidFrac)·N) training windows for training and the rest for validation. A train
// shard never mixes the two splits.
func NewPlan(s Settings, calibWindows, trainWindows int) (*Plan, error) {
	if err := s.Validate(); err != nil {
		return nil, err
	}
	if calibWindows < 1 {
		return nil, fmt.Errorf("%w: the calibration data holds no window of %d tokens", ErrPlan, s.SeqLen)
	}
	p := &Plan{RunID: s.RunID(), Settings: s, CalibWindows: min(calibWindows, s.CalibWindows)}
	p.Stats = cut(SplitCalib, 0, p.CalibWindows, s.ShardWindows, 0)
	if s.Train != "" {
		if trainWindows < 2 && s.ValidFrac > 0 {
			return nil, fmt.Errorf("%w: the training data holds %d windows of %d tokens; need at least 2", ErrPlan, trainWindows, s.SeqLen)
		}
		p.TrainWindows = int(float64(trainWindows) * (1 - s.ValidFrac))
		p.ValidWindows = trainWindows - p.TrainWindows
		p.Cache = cut(SplitTrain, 0, p.TrainWindows, s.ShardWindows, 0)
		p.Cache = append(p.Cache, cut(SplitValid, p.TrainWindows, p.ValidWindows, s.ShardWindows, len(p.Cache))...)
	}
	return p, nil
}

func cut(split Split, first, n, per, firstID int) []Shard {
	var out []Shard
	for lo := 0; lo < n; lo += per {
		out = append(out, Shard{ID: firstID + len(out), Split: split, First: first + lo, Windows: min(per, n-lo)})
	}
	return out
}

// Shards returns the shards of a phase (nil for phases without shards).
func (p *Plan) Shards(ph Phase) []Shard {
	switch ph {
	case PhaseStats:
		return p.Stats
	case PhaseCache:
		return p.Cache
	}
	return nil
}
