package worker

import (
	"fmt"
	"strconv"
	"strings"
)

// Limits of the names this package builds. Run ids and consumer names become
// parts of stream names and subjects, so they are restricted to [A-Za-z0-9_-].
const (
	maxRunIDLen = 64
	maxPhaseLen = 32
	maxNameLen  = 64
)

// validToken reports whether s is 1..max bytes of [A-Za-z0-9_-].
func validToken(s string, max int) bool {
	if len(s) == 0 || len(s) > max {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '_', c == '-':
		default:
			return false
		}
	}
	return true
}

// ValidateRunID returns an error wrapping ErrInvalidRunID unless run matches
// ^[A-Za-z0-9_-]{1,64}$.
func ValidateRunID(run string) error {
	if !validToken(run, maxRunIDLen) {
		return fmt.Errorf("%w: %q (want 1-%d of [A-Za-z0-9_-])", ErrInvalidRunID, run, maxRunIDLen)
	}
	return nil
}

// ValidatePhase returns an error wrapping ErrInvalidPhase unless phase matches
// ^[A-Za-z0-9_-]{1,32}$. Subject builders panic on a phase that fails it.
func ValidatePhase(phase string) error {
	if !validToken(phase, maxPhaseLen) {
		return fmt.Errorf("%w: %q (want 1-%d of [A-Za-z0-9_-])", ErrInvalidPhase, phase, maxPhaseLen)
	}
	return nil
}

// validateName checks a durable consumer name.
func validateName(name string) error {
	if !validToken(name, maxNameLen) {
		return fmt.Errorf("%w: %q (want 1-%d of [A-Za-z0-9_-])", ErrInvalidName, name, maxNameLen)
	}
	return nil
}

// Names derives every stream, bucket and subject of one run from its run id, so
// two runs sharing a server never see each other's messages. The zero value is
// not usable; build one with NewNames.
type Names struct {
	run string
}

// NewNames validates run (see ValidateRunID) and returns its names.
func NewNames(run string) (Names, error) {
	if err := ValidateRunID(run); err != nil {
		return Names{}, err
	}
	return Names{run: run}, nil
}

// Run returns the run id.
func (n Names) Run() string { return n.run }

// TasksStream is the WorkQueue stream of shard tasks: "LP_<run>_TASKS".
func (n Names) TasksStream() string { return "LP_" + n.run + "_TASKS" }

// TasksSubjects is the subject filter of the tasks stream: "lp.<run>.task.>".
func (n Names) TasksSubjects() string { return "lp." + n.run + ".task.>" }

// DataStream is the Limits stream of record batches: "LP_<run>_DATA".
func (n Names) DataStream() string { return "LP_" + n.run + "_DATA" }

// DataSubjects is the subject filter of the data stream: "lp.<run>.data.>".
func (n Names) DataSubjects() string { return "lp." + n.run + ".data.>" }

// DeadStream is the stream holding dead-letter records: "LP_<run>_DEAD".
func (n Names) DeadStream() string { return "LP_" + n.run + "_DEAD" }

// DeadLetterSubject is where dead-letter records are published: "lp.<run>.dead".
func (n Names) DeadLetterSubject() string { return "lp." + n.run + ".dead" }

// KVBucket is the coordinator's key-value bucket: "LP_<run>".
func (n Names) KVBucket() string { return "LP_" + n.run }

// ObjectStore is the run's object store bucket: "LP_<run>_OBJ".
func (n Names) ObjectStore() string { return "LP_" + n.run + "_OBJ" }

// GradStore is the run's object store of the students' shared state: the per-window
// gradients of the steps they split and their checkpoints: "LP_<run>_GRAD". A bucket of
// its own so that the students may write any object in it (the names change with the
// step) and no object of the run's other store.
func (n Names) GradStore() string { return "LP_" + n.run + "_GRAD" }

func mustPhase(phase string) {
	if err := ValidatePhase(phase); err != nil {
		panic(err)
	}
}

func mustIndex(what string, v int) {
	if v < 0 {
		panic(fmt.Sprintf("worker: negative %s %d", what, v))
	}
}

// TaskSubject is "lp.<run>.task.<phase>". It panics if phase fails ValidatePhase.
func (n Names) TaskSubject(phase string) string {
	mustPhase(phase)
	return "lp." + n.run + ".task." + phase
}

// ParseTaskSubject returns the phase of a subject built by TaskSubject, or an
// error wrapping ErrInvalidSubject.
func (n Names) ParseTaskSubject(s string) (string, error) {
	prefix := "lp." + n.run + ".task."
	phase, ok := strings.CutPrefix(s, prefix)
	if !ok || !validToken(phase, maxPhaseLen) {
		return "", fmt.Errorf("%w: %q is not a task subject of run %s", ErrInvalidSubject, s, n.run)
	}
	return phase, nil
}

// DataFilter is the subject filter of every data message of one phase:
// "lp.<run>.data.<phase>.>". It panics if phase fails ValidatePhase.
func (n Names) DataFilter(phase string) string {
	mustPhase(phase)
	return "lp." + n.run + ".data." + phase + ".>"
}

// ShardFilter matches every data message of one shard, its done marker included:
// "lp.<run>.data.<phase>.<shard>.>". It panics like DoneSubject.
func (n Names) ShardFilter(phase string, shard int) string {
	mustPhase(phase)
	mustIndex("shard", shard)
	return "lp." + n.run + ".data." + phase + "." + strconv.Itoa(shard) + ".>"
}

// DoneFilter matches the done markers of every shard of a phase:
// "lp.<run>.data.<phase>.*.done". It panics if phase fails ValidatePhase.
func (n Names) DoneFilter(phase string) string {
	mustPhase(phase)
	return "lp." + n.run + ".data." + phase + ".*.done"
}

// DataSubject is "lp.<run>.data.<phase>.<shard>.<window>.<chunk>". It panics if
// phase fails ValidatePhase or a number is negative.
func (n Names) DataSubject(phase string, shard, window, chunk int) string {
	mustPhase(phase)
	mustIndex("shard", shard)
	mustIndex("window", window)
	mustIndex("chunk", chunk)
	return "lp." + n.run + ".data." + phase + "." + strconv.Itoa(shard) + "." +
		strconv.Itoa(window) + "." + strconv.Itoa(chunk)
}

// DoneSubject is "lp.<run>.data.<phase>.<shard>.done", the marker a teacher
// publishes after the last chunk of a shard. It panics like DataSubject.
func (n Names) DoneSubject(phase string, shard int) string {
	mustPhase(phase)
	mustIndex("shard", shard)
	return "lp." + n.run + ".data." + phase + "." + strconv.Itoa(shard) + ".done"
}

// DataKey identifies one data message. For a done marker Done is true and
// Window and Chunk are zero.
type DataKey struct {
	Run    string
	Phase  string
	Shard  int
	Window int
	Chunk  int
	Done   bool
	// Attempt is the task's attempt nonce ("" for a shard's first task): it is part of the
	// message id only, so a recomputed shard's records are stored even when an earlier
	// attempt's ids were taken (by junk published under them, say). Not in the subject.
	Attempt string
}

// Subject rebuilds the subject of k. It panics if k is not valid (as for DataSubject).
func (k DataKey) Subject() string {
	if err := ValidateRunID(k.Run); err != nil {
		panic(err)
	}
	n := Names{run: k.Run}
	if k.Done {
		return n.DoneSubject(k.Phase, k.Shard)
	}
	return n.DataSubject(k.Phase, k.Shard, k.Window, k.Chunk)
}

// MsgID is the deterministic Nats-Msg-Id of the data message k:
// "<run>/<phase>/<shard>/<window>/<chunk>" or "<run>/<phase>/<shard>/done", followed by
// "/<attempt>" when k.Attempt is set (it must then be 1-32 of [A-Za-z0-9_-]).
// Two publishes of the same key inside the stream's duplicate window are stored
// once. It panics if k is not valid (as for DataSubject).
func MsgID(k DataKey) string {
	if err := ValidateRunID(k.Run); err != nil {
		panic(err)
	}
	mustPhase(k.Phase)
	mustIndex("shard", k.Shard)
	suffix := ""
	if k.Attempt != "" {
		if !validToken(k.Attempt, maxPhaseLen) {
			panic(fmt.Sprintf("worker: bad attempt %q", k.Attempt))
		}
		suffix = "/" + k.Attempt
	}
	if k.Done {
		return k.Run + "/" + k.Phase + "/" + strconv.Itoa(k.Shard) + "/done" + suffix
	}
	mustIndex("window", k.Window)
	mustIndex("chunk", k.Chunk)
	return k.Run + "/" + k.Phase + "/" + strconv.Itoa(k.Shard) + "/" +
		strconv.Itoa(k.Window) + "/" + strconv.Itoa(k.Chunk) + suffix
}

// parseIndex accepts the canonical decimal form of a non-negative int: digits
// only, no sign, no leading zero (except "0"), no overflow.
func parseIndex(tok string) (int, bool) {
	if len(tok) == 0 || (len(tok) > 1 && tok[0] == '0') {
		return 0, false
	}
	for i := 0; i < len(tok); i++ {
		if tok[i] < '0' || tok[i] > '9' {
			return 0, false
		}
	}
	v, err := strconv.ParseInt(tok, 10, strconv.IntSize)
	if err != nil {
		return 0, false
	}
	return int(v), true
}

// ParseDataSubject parses a subject built by DataSubject or DoneSubject of this
// run. It is strict: the run must be n's, the phase valid, numbers canonical
// non-negative decimals that fit an int, and the token count exact; anything
// else returns an error wrapping ErrInvalidSubject. For every subject it
// accepts, rebuilding it from the key gives back s.
func (n Names) ParseDataSubject(s string) (DataKey, error) {
	bad := func(why string) (DataKey, error) {
		return DataKey{}, fmt.Errorf("%w: %q: %s", ErrInvalidSubject, s, why)
	}
	toks := strings.Split(s, ".")
	if len(toks) != 6 && len(toks) != 7 {
		return bad("wrong number of tokens")
	}
	if toks[0] != "lp" || toks[2] != "data" {
		return bad("not a data subject")
	}
	if toks[1] != n.run {
		return bad("wrong run")
	}
	k := DataKey{Run: n.run, Phase: toks[3]}
	if !validToken(k.Phase, maxPhaseLen) {
		return bad("bad phase")
	}
	var ok bool
	if k.Shard, ok = parseIndex(toks[4]); !ok {
		return bad("bad shard")
	}
	if len(toks) == 6 {
		if toks[5] != "done" {
			return bad("want done marker")
		}
		k.Done = true
		return k, nil
	}
	if k.Window, ok = parseIndex(toks[5]); !ok {
		return bad("bad window")
	}
	if k.Chunk, ok = parseIndex(toks[6]); !ok {
		return bad("bad chunk")
	}
	return k, nil
}
