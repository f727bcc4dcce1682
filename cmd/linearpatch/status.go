package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"linearpatch/cache"
	"linearpatch/coordinator"
	"linearpatch/protocol"
	"linearpatch/shards"
	"linearpatch/worker"
)

// statusJSON is status --json: durations in seconds, lists that are [] when empty.
type statusJSON struct {
	Run         string                   `json:"run"`
	Phase       protocol.Phase           `json:"phase"`
	Updated     time.Time                `json:"updated"`
	AgeSeconds  float64                  `json:"age_seconds"` // since the coordinator's last snapshot
	Phases      []phaseJSON              `json:"phases"`
	Teachers    []teacherJSON            `json:"teachers"`
	CacheWriter *writerJSON              `json:"cache_writer"` // null when none holds the run
	Warning     string                   `json:"warning,omitempty"`
	Server      string                   `json:"server"`             // "up", or "gone" when read from the run directory
	Recorded    *runDirRecord            `json:"run_dir,omitempty"`  // what the run directory records (server gone)
	Pending     map[protocol.Phase][]int `json:"pending_shards"`     // the same ids as Phases[].pending_shards
	Student     *protocol.StudentStatus  `json:"student,omitempty"`  // a network student's last report
	Students    *studentsJSON            `json:"students,omitempty"` // the students sharing the steps
}

type phaseJSON struct {
	Phase         protocol.Phase `json:"phase"`
	Done          int            `json:"done"`
	Leased        int            `json:"leased"`
	Pending       int            `json:"pending"`
	Total         int            `json:"total"`
	PendingShards []int          `json:"pending_shards"`
}

type teacherJSON struct {
	Name            string         `json:"name"`
	Phase           protocol.Phase `json:"phase"`
	Shard           int            `json:"shard"`
	TokensPerSec    float64        `json:"tokens_per_s"`
	TotalTokens     int64          `json:"total_tokens"`
	Threads         int            `json:"threads"`
	LastSeen        time.Time      `json:"last_seen"`
	LastSeenSecsAgo float64        `json:"last_seen_seconds_ago"`
}

type writerJSON struct {
	Host           string  `json:"host"`
	PID            int     `json:"pid"`
	Dir            string  `json:"dir"`
	RenewalSeconds float64 `json:"renewal_seconds"`
}

// runDirRecord is what a run directory says about its run without the server.
type runDirRecord struct {
	Dir          string `json:"dir"`
	NATSURL      string `json:"nats_url,omitempty"`
	Finished     bool   `json:"finished"`
	StatsShards  int    `json:"stats_shards"`
	CacheShards  int    `json:"cache_shards"`
	TrainWindows int    `json:"train_windows"`
	ValidWindows int    `json:"valid_windows"`
	Fitted       bool   `json:"fitted"`
	Start        int    `json:"start,omitempty"`
	End          int    `json:"end,omitempty"`
	Method       string `json:"method,omitempty"`
	CachedShards int    `json:"cached_shards"`
	CacheBytes   int64  `json:"cache_bytes"`
	StudentDir   bool   `json:"student"`
}

// statusView turns a coordinator snapshot (and the cache writer) into status --json.
func statusView(st coordinator.Status, writer *cache.Holder, now time.Time) statusJSON {
	v := statusJSON{Run: st.Run, Phase: st.Phase, Updated: st.Updated, AgeSeconds: now.Sub(st.Updated).Seconds(),
		Phases: []phaseJSON{}, Teachers: []teacherJSON{}, Warning: st.Warning, Server: "up", Pending: map[protocol.Phase][]int{}}
	for _, ph := range []protocol.Phase{protocol.PhaseStats, protocol.PhaseCache} {
		pending := st.Pending[ph]
		if pending == nil {
			pending = []int{}
		}
		v.Pending[ph] = pending
		if st.Total[ph] == 0 {
			continue
		}
		v.Phases = append(v.Phases, phaseJSON{Phase: ph, Done: st.Done[ph], Leased: st.Leased[ph],
			Pending: st.Total[ph] - st.Done[ph] - st.Leased[ph], Total: st.Total[ph], PendingShards: pending})
	}
	names := make([]string, 0, len(st.Teachers))
	for n := range st.Teachers {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		t := st.Teachers[n]
		v.Teachers = append(v.Teachers, teacherJSON{Name: n, Phase: t.Phase, Shard: t.Shard, TokensPerSec: t.TokensPerSec,
			TotalTokens: t.TotalTokens, Threads: t.Threads, LastSeen: t.LastSeen, LastSeenSecsAgo: now.Sub(t.LastSeen).Seconds()})
	}
	if writer != nil {
		v.CacheWriter = &writerJSON{Host: writer.Host, PID: writer.PID, Dir: writer.Dir, RenewalSeconds: writer.Renewal.Seconds()}
	}
	return v
}

// printStatus writes the status table.
func printStatus(w io.Writer, v statusJSON, writerErr error) {
	fmt.Fprintf(w, "run %s: phase %s (as of %s)\n\n", v.Run, v.Phase, v.Updated.Format(time.RFC3339))
	if v.Warning != "" {
		fmt.Fprintf(w, "WARNING: %s\n\n", v.Warning)
	}
	fmt.Fprintln(w, "| phase | done | leased | pending | total |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|")
	for _, p := range v.Phases {
		fmt.Fprintf(w, "| %s | %d | %d | %d | %d |\n", p.Phase, p.Done, p.Leased, p.Pending, p.Total)
	}
	for _, p := range v.Phases {
		if len(p.PendingShards) > 0 {
			fmt.Fprintf(w, "\npending %s shards: %s\n", p.Phase, intList(p.PendingShards, 40))
		}
	}
	switch {
	case writerErr != nil:
		fmt.Fprintf(w, "\ncache writer: unknown (%v)\n", writerErr)
	case v.CacheWriter == nil:
		fmt.Fprintln(w, "\ncache writer: none")
	default:
		fmt.Fprintf(w, "\ncache writer: %s\n", cache.Holder{Host: v.CacheWriter.Host, PID: v.CacheWriter.PID, Dir: v.CacheWriter.Dir})
	}
	if v.Student != nil {
		fmt.Fprintf(w, "\n%s\n", studentLine(*v.Student, time.Now()))
	}
	printStudents(w, v.Students)
	if len(v.Teachers) > 0 {
		fmt.Fprintln(w, "\n| teacher | tokens/s | tokens | threads | working on | last seen |")
		fmt.Fprintln(w, "|---|---:|---:|---:|---|---|")
		for _, t := range v.Teachers {
			fmt.Fprintf(w, "| %s | %.0f | %d | %d | %s %d | %s ago |\n", t.Name, t.TokensPerSec, t.TotalTokens, t.Threads,
				t.Phase, t.Shard, (time.Duration(t.LastSeenSecsAgo * float64(time.Second))).Round(time.Second))
		}
	}
}

// intList prints ids, eliding after max of them.
func intList(ids []int, max int) string {
	var b strings.Builder
	for i, id := range ids {
		if i == max {
			fmt.Fprintf(&b, " … (%d in all)", len(ids))
			break
		}
		if i > 0 {
			b.WriteString(" ")
		}
		fmt.Fprint(&b, id)
	}
	return b.String()
}

// serverGone reports whether nothing listens at any address of the NATS URL(s) raw (one
// dial each, timeout d): the embedded server of a run that has ended.
func serverGone(raw string, d time.Duration) bool {
	for _, part := range strings.Split(raw, ",") {
		u, err := url.Parse(strings.TrimSpace(part))
		if err != nil || u.Host == "" {
			return false // not ours to judge: let the connect report it
		}
		c, err := net.DialTimeout("tcp", u.Host, d)
		if err == nil {
			c.Close()
			return false
		}
	}
	return true
}

// offlineStatus reports a run whose embedded server is gone from its run directory alone.
func offlineStatus(w io.Writer, runDir, natsURL string, asJSON bool) error {
	st, err := coordinator.ReadStatusFile(runDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	rec := &runDirRecord{Dir: runDir, NATSURL: natsURL}
	var plan protocol.Plan
	if b, err := os.ReadFile(filepath.Join(runDir, protocol.PlanFile)); err == nil && json.Unmarshal(b, &plan) == nil {
		rec.StatsShards, rec.CacheShards = len(plan.Stats), len(plan.Cache)
		rec.TrainWindows, rec.ValidWindows = plan.TrainWindows, plan.ValidWindows
	}
	var fit protocol.FitResult
	if b, err := os.ReadFile(filepath.Join(runDir, protocol.FitFile)); err == nil && json.Unmarshal(b, &fit) == nil {
		rec.Fitted, rec.Start, rec.End, rec.Method = true, fit.Start, fit.End, fit.Method
	}
	if m, err := shards.LoadManifest(filepath.Join(runDir, "cache", cache.ManifestFile)); err == nil {
		rec.CachedShards = len(m.Shards)
		for _, e := range m.Shards {
			rec.CacheBytes += e.Bytes
		}
	}
	if _, err := os.Stat(studentDir(runDir)); err == nil {
		rec.StudentDir = true
	}
	v := statusJSON{Phases: []phaseJSON{}, Teachers: []teacherJSON{}, Server: "gone", Recorded: rec, Pending: map[protocol.Phase][]int{}}
	if st != nil {
		v = statusView(*st, nil, time.Now())
		v.Server, v.Recorded, v.Warning = "gone", rec, ""
		rec.Finished = st.Phase == protocol.PhaseDone
	} else if b, err := os.ReadFile(filepath.Join(runDir, "run.id")); err == nil {
		v.Run = strings.TrimSpace(string(b))
	}
	if asJSON {
		return json.NewEncoder(w).Encode(v)
	}
	switch {
	case rec.Finished:
		fmt.Fprintf(w, "run %s finished (phase done as of %s); its NATS server (%s) is gone with it.\n", v.Run, v.Updated.Format(time.RFC3339), natsURL)
	case st != nil:
		fmt.Fprintf(w, "run %s: its NATS server (%s) does not answer; the run was in phase %s as of %s. Rerun its command to resume.\n",
			v.Run, natsURL, v.Phase, v.Updated.Format(time.RFC3339))
	default:
		fmt.Fprintf(w, "run %s: its NATS server (%s) does not answer and the run directory holds no status.\n", v.Run, natsURL)
	}
	fmt.Fprintf(w, "\nThe run directory %s records:\n", runDir)
	fmt.Fprintf(w, "- plan: %d stats shards, %d cache shards (%d training, %d validation windows)\n", rec.StatsShards, rec.CacheShards, rec.TrainWindows, rec.ValidWindows)
	if rec.Fitted {
		fmt.Fprintf(w, "- training-free patch: block [%d, %d), method %s\n", rec.Start, rec.End, rec.Method)
	}
	fmt.Fprintf(w, "- cache: %d of %d shards, %.1f MiB in %s\n", rec.CachedShards, rec.CacheShards, float64(rec.CacheBytes)/(1<<20), filepath.Join(runDir, "cache"))
	if rec.StudentDir {
		fmt.Fprintf(w, "- student: checkpoint and curve in %s\n", studentDir(runDir))
	}
	return nil
}

// runStatus is the status command.
func runStatus(cmd *cobra.Command, _ []string) error {
	s, err := resolve(cmd)
	if err != nil {
		return err
	}
	if runDir := s.str("run-dir"); s.str("nats") == "" && runDir != "" {
		if b, err := os.ReadFile(filepath.Join(runDir, "nats.url")); err == nil && serverGone(string(b), 2*time.Second) {
			return offlineStatus(cmd.OutOrStdout(), runDir, strings.TrimSpace(string(b)), s.flag("json"))
		}
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), 20*time.Second)
	defer cancel()
	conn, names, err := joinRun(ctx, s, worker.RoleStatus, "linearpatch-status")
	if err != nil {
		return err
	}
	defer conn.Close()
	kv, err := conn.js.KeyValue(ctx, names.KVBucket())
	if err != nil {
		return fmt.Errorf("run %s: %w", names.Run(), err)
	}
	var st coordinator.Status
	e, err := kv.Get(ctx, coordinator.KeyStatus)
	if err != nil {
		return fmt.Errorf("run %s has no status yet (is its coordinator running?): %w", names.Run(), err)
	}
	if err := json.Unmarshal(e.Value(), &st); err != nil {
		return err
	}
	writer, werr := cache.CurrentWriter(ctx, kv)
	v := statusView(st, writer, time.Now())
	v.Student = readStudentStatus(ctx, kv)
	v.Students = readStudents(ctx, kv, time.Now())
	if s.flag("json") {
		return json.NewEncoder(cmd.OutOrStdout()).Encode(v)
	}
	printStatus(cmd.OutOrStdout(), v, werr)
	return nil
}
