package protocol

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
)

// ErrPlan is wrapped by errors about an invalid or mismatched run plan.
var ErrPlan = errors.New("protocol: invalid plan")

// Phase names a stage of a run.
type Phase string

const (
	PhaseStats   Phase = "stats"   // calibration statistics, merged into the training-free patch
	PhaseCache   Phase = "cache"   // teacher activations for distillation
	PhaseStudent Phase = "student" // offline distillation of the patch
	PhaseDone    Phase = "done"
)

// PlanVersion is the version of the run state this code writes: the plan (in the run
// directory's plan.json and the run's KV bucket) and, through the plan, every checkpoint and
// manifest of the run. Version 1 (no "version" field) named runs by a hash of their settings.
const PlanVersion = 2

// ErrVersion is wrapped by errors about run state written by another version.
var ErrVersion = errors.New("protocol: run state of another version")

// Settings are the user's choices that define a run. The paths (Model, Calib, Train) are
// informative only; what determines the run's tokens and targets is the rest: the model's
// fingerprint, the hashes of the tokenizer and data files and the numbers (see Mismatch).
type Settings struct {
	Model        string  `json:"model"`
	Fingerprint  string  `json:"fingerprint"`
	Tokenizer    string  `json:"tokenizer_sha256,omitempty"` // hash of the tokenizer files beside the model ("" for none)
	Calib        string  `json:"calib"`
	CalibSHA256  string  `json:"calib_sha256"`
	CalibWindows int     `json:"calib_windows"`
	Train        string  `json:"train"`
	TrainSHA256  string  `json:"train_sha256,omitempty"`
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
	TextColumn   string  `json:"text_column,omitempty"` // --text-column of Parquet/Arrow calib and train data
}

// Validate checks the settings.
func (s Settings) Validate() error {
	switch {
	case s.Model == "" || s.Fingerprint == "":
		return fmt.Errorf("%w: model and its fingerprint are required", ErrPlan)
	case s.Calib == "" || s.CalibSHA256 == "":
		return fmt.Errorf("%w: calibration data and its hash are required", ErrPlan)
	case s.Train != "" && s.TrainSHA256 == "":
		return fmt.Errorf("%w: the training data's hash is required", ErrPlan)
	case s.CalibWindows < 1 || s.SeqLen < 2 || s.NumPrune < 1 || s.ShardWindows < 1 || s.TopK < 1:
		return fmt.Errorf("%w: calib-windows, num-prune, shard-windows and top-k must be ≥ 1 and seq-len ≥ 2", ErrPlan)
	case s.ValidFrac < 0 || s.ValidFrac >= 1:
		return fmt.Errorf("%w: validation fraction %v outside [0, 1)", ErrPlan, s.ValidFrac)
	}
	return nil
}

// pathKeys are the settings that name files rather than determine the run.
var pathKeys = map[string]bool{"model": true, "calib": true, "train": true}

// Mismatch lists, sorted, the JSON keys of the settings that determine a run's tokens and
// targets and differ between s and o, each with both values ("top_k: 50 → 20"; hashes are
// shortened). Paths are not compared: a moved file with the same contents is the same run.
func (s Settings) Mismatch(o Settings) []string {
	a, b := settingsMap(s), settingsMap(o)
	var diff []string
	keys := map[string]bool{}
	for k := range a {
		keys[k] = true
	}
	for k := range b {
		keys[k] = true
	}
	val := func(m map[string]any, k string) string {
		if v, ok := m[k]; ok {
			return short(fmt.Sprint(v))
		}
		return "(none)"
	}
	for k := range keys {
		if x, y := val(a, k), val(b, k); !pathKeys[k] && x != y {
			diff = append(diff, fmt.Sprintf("%s: %s → %s", k, x, y))
		}
	}
	sort.Strings(diff)
	return diff
}

func settingsMap(s Settings) map[string]any {
	b, _ := json.Marshal(s)
	m := map[string]any{}
	_ = json.Unmarshal(b, &m)
	return m
}

func short(v string) string {
	if len(v) > 16 {
		return v[:12] + "…"
	}
	if v == "" {
		return `""`
	}
	return v
}

// NewRunID returns a fresh random run id: "r" and 24 hex digits (96 bits from crypto/rand),
// so a run's names cannot be guessed from its settings.
func NewRunID() string {
	var b [12]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(fmt.Sprintf("protocol: no randomness for a run id: %v", err))
	}
	return "r" + hex.EncodeToString(b[:])
}

// CheckVersion returns an error wrapping ErrVersion unless p was written by this version.
func (p *Plan) CheckVersion() error {
	if p.Version != PlanVersion {
		v := p.Version
		if v == 0 {
			v = 1
		}
		return fmt.Errorf("%w: run %s was written by linearpatch run-state version %d; this linearpatch reads only version %d: start a new run (a new run directory)",
			ErrVersion, p.RunID, v, PlanVersion)
	}
	return nil
}

// CheckResume says whether a run planned as p may be resumed with settings s: p must be of
// this version and s must not differ in anything that determines the run's tokens and
// targets. Errors wrap ErrVersion or ErrPlan and name what changed.
func (p *Plan) CheckResume(s Settings) error {
	if err := p.CheckVersion(); err != nil {
		return err
	}
	if d := p.Settings.Mismatch(s); len(d) > 0 {
		return fmt.Errorf("%w: run %s cannot resume with these inputs and settings; changed: %s (start a new run with another run directory)",
			ErrPlan, p.RunID, strings.Join(d, "; "))
	}
	return nil
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
	Version      int      `json:"version"` // PlanVersion
	RunID        string   `json:"run_id"`
	Settings     Settings `json:"settings"`
	CalibWindows int      `json:"calib_windows"` // windows in the stats phase
	TrainWindows int      `json:"train_windows"` // windows the student trains on
	ValidWindows int      `json:"valid_windows"` // held-out windows
	Stats        []Shard  `json:"stats"`         // stats-phase shards over the calibration stream
	Cache        []Shard  `json:"cache"`         // cache-phase shards: train shards then valid shards
}

// NewPlan plans run runID (see NewRunID): it cuts calibWindows and trainWindows (the numbers of windows in the calibration and
// training streams) into shards of at most ShardWindows windows. The stats phase covers the
// first min(CalibWindows, calibWindows) calibration windows; the cache phase the first
// floor((1−ValidFrac)·N) training windows for training and the rest for validation. A train
// shard never mixes the two splits.
func NewPlan(runID string, s Settings, calibWindows, trainWindows int) (*Plan, error) {
	if err := s.Validate(); err != nil {
		return nil, err
	}
	if runID == "" {
		return nil, fmt.Errorf("%w: empty run id", ErrPlan)
	}
	if calibWindows < 1 {
		return nil, fmt.Errorf("%w: the calibration data holds no window of %d tokens", ErrPlan, s.SeqLen)
	}
	p := &Plan{Version: PlanVersion, RunID: runID, Settings: s, CalibWindows: min(calibWindows, s.CalibWindows)}
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
