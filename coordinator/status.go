package coordinator

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"linearpatch/internal/atomicfile"
	"linearpatch/protocol"
)

// StatusFile is the run directory's copy of the last status snapshot, so that `status`
// can say where a run stands once its server is gone (a finished single-process run).
const StatusFile = "status.json"

// ReadStatusFile reads the status snapshot a coordinator last wrote into runDir.
func ReadStatusFile(runDir string) (*Status, error) {
	b, err := os.ReadFile(filepath.Join(runDir, StatusFile))
	if err != nil {
		return nil, fmt.Errorf("coordinator: %w", err)
	}
	var st Status
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("coordinator: %s: %w", filepath.Join(runDir, StatusFile), err)
	}
	return &st, nil
}

// writeStatusFile writes st to the run directory, logging (not returning) a failure: the
// copy only serves `status` after the server is gone.
func (c *Coordinator) writeStatusFile(st Status) {
	b, err := json.MarshalIndent(st, "", "  ")
	if err == nil {
		err = atomicfile.Write(filepath.Join(c.o.RunDir, StatusFile), b, 0o644)
	}
	if err != nil {
		c.log.Warn("status not written to the run directory", "err", err)
	}
}

// pendingShards lists the pending shards of each phase by id (an empty list, not nil, for
// a phase with none).
func pendingShards(states []ShardState) map[protocol.Phase][]int {
	out := map[protocol.Phase][]int{protocol.PhaseStats: {}, protocol.PhaseCache: {}}
	for _, s := range states {
		if s.Status == StatusPending {
			out[s.Phase] = append(out[s.Phase], s.ID)
		}
	}
	return out
}

// checkTeachers sets the status warning from TeacherWarning at now, logs it when it
// appears or clears, and returns the status.
func (c *Coordinator) checkTeachers(now time.Time) Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	w := TeacherWarning(c.status, now, c.o.Lease, c.began)
	switch {
	case w != "" && c.status.Warning == "":
		c.log.Warn("the run is stalled: "+w, "phase", c.status.Phase)
	case w == "" && c.status.Warning != "":
		c.log.Info("a teacher reports again; the run goes on", "phase", c.status.Phase)
	}
	c.status.Warning = w
	return c.status
}

// TeacherWarning says why st makes no progress at now, or "" when it does not know of a
// reason: shards of the current phase wait with no teacher on them, and no teacher has
// reported within lease — every teacher that came is gone, or none came since began.
func TeacherWarning(st Status, now time.Time, lease time.Duration, began time.Time) string {
	if st.Phase != protocol.PhaseStats && st.Phase != protocol.PhaseCache {
		return ""
	}
	waiting := len(st.Pending[st.Phase])
	if waiting == 0 {
		return ""
	}
	var last time.Time
	for _, t := range st.Teachers {
		if now.Sub(t.LastSeen) <= lease {
			return ""
		}
		if t.LastSeen.After(last) {
			last = t.LastSeen
		}
	}
	if len(st.Teachers) > 0 {
		return fmt.Sprintf("all %d teachers are gone (the last report was %s ago; lease %s) and %d %s shards wait: start teachers",
			len(st.Teachers), now.Sub(last).Round(time.Second), lease, waiting, st.Phase)
	}
	if now.Sub(began) > lease {
		return fmt.Sprintf("no teacher has reported in the %s since the coordinator started, and %d %s shards wait: start teachers",
			now.Sub(began).Round(time.Second), waiting, st.Phase)
	}
	return ""
}
