package coordinator

import (
	"strings"
	"testing"
	"time"

	"linearpatch/protocol"
)

func TestTeacherWarning(t *testing.T) {
	began := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	lease := 30 * time.Second
	seen := func(ago ...time.Duration) map[string]TeacherStatus {
		m := map[string]TeacherStatus{}
		for i, a := range ago {
			m[string(rune('a'+i))] = TeacherStatus{LastSeen: began.Add(10*time.Minute - a)}
		}
		return m
	}
	now := began.Add(10 * time.Minute)
	waiting := map[protocol.Phase][]int{protocol.PhaseStats: {}, protocol.PhaseCache: {3, 4}}
	for _, c := range []struct {
		name string
		st   Status
		now  time.Time
		want string // substring; "" for no warning
	}{
		{"all gone", Status{Phase: protocol.PhaseCache, Pending: waiting, Teachers: seen(time.Minute, 2*time.Minute)}, now, "all 2 teachers are gone"},
		{"one alive", Status{Phase: protocol.PhaseCache, Pending: waiting, Teachers: seen(time.Minute, 5*time.Second)}, now, ""},
		{"none came", Status{Phase: protocol.PhaseCache, Pending: waiting}, now, "no teacher has reported"},
		{"none yet, early", Status{Phase: protocol.PhaseCache, Pending: waiting}, began.Add(10 * time.Second), ""},
		{"nothing pending", Status{Phase: protocol.PhaseCache, Pending: map[protocol.Phase][]int{protocol.PhaseCache: {}}, Teachers: seen(time.Hour)}, now, ""},
		{"student phase", Status{Phase: protocol.PhaseStudent, Pending: waiting, Teachers: seen(time.Hour)}, now, ""},
		{"done", Status{Phase: protocol.PhaseDone, Teachers: seen(time.Hour)}, now, ""},
	} {
		got := TeacherWarning(c.st, c.now, lease, began)
		if (c.want == "") != (got == "") || !strings.Contains(got, c.want) {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
		if got != "" && !strings.Contains(got, "2 cache shards wait") {
			t.Errorf("%s: %q does not say what waits", c.name, got)
		}
	}
}

func TestPendingShards(t *testing.T) {
	got := pendingShards([]ShardState{{Phase: protocol.PhaseStats, ID: 0, Status: StatusDone}, {Phase: protocol.PhaseCache, ID: 2, Status: StatusPending},
		{Phase: protocol.PhaseCache, ID: 5, Status: StatusLeased}, {Phase: protocol.PhaseCache, ID: 7, Status: StatusPending}})
	if got[protocol.PhaseStats] == nil || len(got[protocol.PhaseStats]) != 0 || len(got[protocol.PhaseCache]) != 2 || got[protocol.PhaseCache][0] != 2 || got[protocol.PhaseCache][1] != 7 {
		t.Fatalf("%v", got)
	}
}
