package worker

import (
	"errors"
	"math"
	"strconv"
	"strings"
	"testing"
)

func TestNames(t *testing.T) {
	n := testNames(t)
	for _, tc := range []struct{ got, want string }{
		{n.TasksStream(), "LP_run-1_TASKS"},
		{n.TasksSubjects(), "lp.run-1.task.>"},
		{n.DataStream(), "LP_run-1_DATA"},
		{n.DataSubjects(), "lp.run-1.data.>"},
		{n.DeadStream(), "LP_run-1_DEAD"},
		{n.DeadLetterSubject(), "lp.run-1.dead"},
		{n.KVBucket(), "LP_run-1"},
		{n.ObjectStore(), "LP_run-1_OBJ"},
		{n.TaskSubject("acts"), "lp.run-1.task.acts"},
		{n.DataFilter("acts"), "lp.run-1.data.acts.>"},
		{n.DataSubject("acts", 3, 0, 12), "lp.run-1.data.acts.3.0.12"},
		{n.DoneSubject("acts", 3), "lp.run-1.data.acts.3.done"},
		{n.ShardFilter("acts", 3), "lp.run-1.data.acts.3.>"},
		{n.DoneFilter("acts"), "lp.run-1.data.acts.*.done"},
		{MsgID(DataKey{Run: "run-1", Phase: "acts", Shard: 3, Window: 0, Chunk: 12}), "run-1/acts/3/0/12"},
		{MsgID(DataKey{Run: "run-1", Phase: "acts", Shard: 3, Done: true}), "run-1/acts/3/done"},
	} {
		if tc.got != tc.want {
			t.Errorf("got %q, want %q", tc.got, tc.want)
		}
	}
}

func TestValidateRunID(t *testing.T) {
	for _, tc := range []struct {
		run string
		ok  bool
	}{
		{"a", true}, {"run_1-B", true}, {strings.Repeat("x", 64), true},
		{"", false}, {strings.Repeat("x", 65), false}, {"a.b", false}, {"a*", false},
		{"a>", false}, {"a b", false}, {"é", false}, {"a/b", false},
	} {
		t.Run(tc.run, func(t *testing.T) {
			_, err := NewNames(tc.run)
			if (err == nil) != tc.ok {
				t.Fatalf("NewNames(%q) = %v, want ok=%v", tc.run, err, tc.ok)
			}
			if err != nil && !errors.Is(err, ErrInvalidRunID) {
				t.Fatalf("error %v does not wrap ErrInvalidRunID", err)
			}
		})
	}
}

func TestBuildersPanicOnBadInput(t *testing.T) {
	n := testNames(t)
	for name, f := range map[string]func(){
		"phase with dot":  func() { n.TaskSubject("a.b") },
		"empty phase":     func() { n.DataSubject("", 0, 0, 0) },
		"negative shard":  func() { n.DataSubject("acts", -1, 0, 0) },
		"negative window": func() { n.DataSubject("acts", 0, -1, 0) },
		"negative chunk":  func() { n.DataSubject("acts", 0, 0, -1) },
		"done negative":   func() { n.DoneSubject("acts", -2) },
		"msgid bad run":   func() { MsgID(DataKey{Run: "a.b", Phase: "acts"}) },
	} {
		t.Run(name, func(t *testing.T) {
			defer func() {
				if recover() == nil {
					t.Fatal("no panic")
				}
			}()
			f()
		})
	}
}

func TestParseDataSubject(t *testing.T) {
	n := testNames(t)
	maxInt := strconv.Itoa(math.MaxInt)
	for _, tc := range []struct {
		s    string
		want DataKey
		ok   bool
	}{
		{"lp.run-1.data.acts.3.0.12", DataKey{Run: "run-1", Phase: "acts", Shard: 3, Chunk: 12}, true},
		{"lp.run-1.data.stats.0.7.0", DataKey{Run: "run-1", Phase: "stats", Window: 7}, true},
		{"lp.run-1.data.acts.3.done", DataKey{Run: "run-1", Phase: "acts", Shard: 3, Done: true}, true},
		{"lp.run-1.data.done.3.done", DataKey{Run: "run-1", Phase: "done", Shard: 3, Done: true}, true},
		{"lp.run-1.data.acts." + maxInt + ".1.2", DataKey{Run: "run-1", Phase: "acts", Shard: math.MaxInt, Window: 1, Chunk: 2}, true},
		{"lp.run-2.data.acts.3.0.12", DataKey{}, false},                  // wrong run
		{"lp.run-1.task.acts.3.0.12", DataKey{}, false},                  // not data
		{"xx.run-1.data.acts.3.0.12", DataKey{}, false},                  // wrong prefix
		{"lp.run-1.data.acts.3.0.12.1", DataKey{}, false},                // extra token
		{"lp.run-1.data.acts.3.0", DataKey{}, false},                     // missing token
		{"lp.run-1.data.acts.3", DataKey{}, false},                       // too short
		{"lp.run-1.data.acts.-3.0.1", DataKey{}, false},                  // negative
		{"lp.run-1.data.acts.+3.0.1", DataKey{}, false},                  // sign
		{"lp.run-1.data.acts.03.0.1", DataKey{}, false},                  // leading zero
		{"lp.run-1.data.acts.3..1", DataKey{}, false},                    // empty token
		{"lp.run-1.data.acts.3.0.1x", DataKey{}, false},                  // junk
		{"lp.run-1.data.acts.3.0. 1", DataKey{}, false},                  // space
		{"lp.run-1.data.acts.9223372036854775808.0.1", DataKey{}, false}, // overflow
		{"lp.run-1.data.acts.99999999999999999999.0.1", DataKey{}, false},
		{"lp.run-1.data.a*.3.0.1", DataKey{}, false}, // wildcard phase
		{"lp.run-1.data.>.3.0.1", DataKey{}, false},
		{"lp.run-1.data..3.0.1", DataKey{}, false},
		{"lp.run-1.data.acts.3.Done", DataKey{}, false},
		{"lp.run-1.data.acts.3.done.0", DataKey{}, false},
		{"", DataKey{}, false},
	} {
		t.Run(tc.s, func(t *testing.T) {
			got, err := n.ParseDataSubject(tc.s)
			if (err == nil) != tc.ok {
				t.Fatalf("ParseDataSubject(%q) = %+v, %v; want ok=%v", tc.s, got, err, tc.ok)
			}
			if err != nil {
				if !errors.Is(err, ErrInvalidSubject) {
					t.Fatalf("error %v does not wrap ErrInvalidSubject", err)
				}
				return
			}
			if got != tc.want {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
			if s := got.Subject(); s != tc.s {
				t.Fatalf("rebuilt %q, want %q", s, tc.s)
			}
		})
	}
}

func TestParseTaskSubject(t *testing.T) {
	n := testNames(t)
	if ph, err := n.ParseTaskSubject(n.TaskSubject("acts")); err != nil || ph != "acts" {
		t.Fatalf("got %q, %v", ph, err)
	}
	for _, s := range []string{"lp.run-1.task.", "lp.run-1.task.a.b", "lp.run-2.task.acts", "lp.run-1.data.acts"} {
		if _, err := n.ParseTaskSubject(s); !errors.Is(err, ErrInvalidSubject) {
			t.Errorf("ParseTaskSubject(%q) = %v, want ErrInvalidSubject", s, err)
		}
	}
}

// FuzzParseDataSubject: the parser never panics, and whatever it accepts is
// canonical — rebuilding the subject from the key gives the input back.
func FuzzParseDataSubject(f *testing.F) {
	for _, s := range []string{
		"lp.run-1.data.acts.3.0.12", "lp.run-1.data.acts.3.done", "lp.run-1.data.acts.-1.0.0",
		"lp.run-1.data.acts.03.0.0", "lp.run-1.data.acts.9223372036854775807.0.0",
		"lp.run-1.data.acts.9223372036854775808.0.0", "lp.run-1.data...", "lp.run-1.data.acts.1.2.3.4", "",
	} {
		f.Add(s)
	}
	n, err := NewNames("run-1")
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, s string) {
		k, err := n.ParseDataSubject(s)
		if err != nil {
			if !errors.Is(err, ErrInvalidSubject) {
				t.Fatalf("error %v does not wrap ErrInvalidSubject", err)
			}
			return
		}
		if got := k.Subject(); got != s {
			t.Fatalf("ParseDataSubject(%q) = %+v, rebuilt as %q", s, k, got)
		}
		if k.Run != "run-1" || k.Shard < 0 || k.Window < 0 || k.Chunk < 0 {
			t.Fatalf("bad key %+v from %q", k, s)
		}
		_ = MsgID(k) // must not panic on a parsed key
	})
}

// FuzzDataSubjectRoundTrip: parse(build(x)) == x for every valid key.
func FuzzDataSubjectRoundTrip(f *testing.F) {
	f.Add("acts", 3, 0, 12, false)
	f.Add("stats", 0, 0, 0, true)
	f.Add("a_b-C", math.MaxInt, math.MaxInt, math.MaxInt, false)
	n, err := NewNames("run-1")
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, phase string, shard, window, chunk int, done bool) {
		if ValidatePhase(phase) != nil || shard < 0 || window < 0 || chunk < 0 {
			return
		}
		want := DataKey{Run: "run-1", Phase: phase, Shard: shard, Window: window, Chunk: chunk, Done: done}
		s := n.DataSubject(phase, shard, window, chunk)
		if done {
			want.Window, want.Chunk = 0, 0
			s = n.DoneSubject(phase, shard)
		}
		got, err := n.ParseDataSubject(s)
		if err != nil {
			t.Fatalf("ParseDataSubject(%q): %v", s, err)
		}
		if got != want {
			t.Fatalf("round trip of %+v gave %+v", want, got)
		}
		if MsgID(got) != MsgID(want) {
			t.Fatal("MsgID differs")
		}
	})
}
