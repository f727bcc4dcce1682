package coordinator

import (
	"math/rand/v2"
	"reflect"
	"testing"
	"time"

	"linearpatch/protocol"
)

func testPlan(t *testing.T, calib, train, per int) *protocol.Plan {
	t.Helper()
	p, err := protocol.NewPlan("rtest", protocol.Settings{Model: "m", Fingerprint: "f", Calib: "c", CalibSHA256: "c1", CalibWindows: 128, Train: "t", TrainSHA256: "t1",
		SeqLen: 16, NumPrune: 2, ShardWindows: per, TopK: 50, ValidFrac: 0.05}, calib, train)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// recorder drives a Core and records what it asked for, like the real driver would.
type recorder struct {
	core      *Core
	published map[protocol.Phase]map[int]int // phase → shard → times published
	persisted map[string]ShardState
	fits      int
	students  int
	finished  bool
	failed    string
}

func newRecorder(c *Core) *recorder {
	return &recorder{core: c, published: map[protocol.Phase]map[int]int{}, persisted: map[string]ShardState{}}
}

func (r *recorder) step(ev Event) {
	queue := []Event{ev}
	for len(queue) > 0 {
		ev, queue = queue[0], queue[1:]
		for _, a := range r.core.Step(ev) {
			switch a := a.(type) {
			case ActPersist:
				for _, s := range a.States {
					r.persisted[s.Key()] = s
				}
			case ActPersistPhase:
			case ActPublishTasks:
				if r.published[a.Phase] == nil {
					r.published[a.Phase] = map[int]int{}
				}
				for _, s := range a.Shards {
					r.published[a.Phase][s.ID]++
				}
			case ActFit:
				r.fits++
				queue = append(queue, EvFitted{})
			case ActStartStudent:
				r.students++
				queue = append(queue, EvStudentDone{})
			case ActFinish:
				r.finished = true
			case ActFail:
				r.failed = a.Reason
			default:
				panic(a)
			}
		}
	}
}

func (r *recorder) restored() []ShardState {
	var out []ShardState
	for _, s := range r.persisted {
		out = append(out, s)
	}
	return out
}

func TestCoreHappyPath(t *testing.T) {
	p := testPlan(t, 70, 100, 32)
	r := newRecorder(NewCore(p, time.Minute, true))
	r.step(EvStart{})
	if got := len(r.published[protocol.PhaseStats]); got != len(p.Stats) {
		t.Fatalf("published %d stats tasks, want %d", got, len(p.Stats))
	}
	if len(r.published[protocol.PhaseCache]) != 0 {
		t.Fatal("cache tasks published before the patch was fitted")
	}
	for _, s := range p.Stats {
		r.step(EvShardDone{Phase: protocol.PhaseStats, Shard: s.ID})
	}
	if r.fits != 1 || len(r.published[protocol.PhaseCache]) != len(p.Cache) {
		t.Fatalf("fits %d, cache tasks %d", r.fits, len(r.published[protocol.PhaseCache]))
	}
	for _, s := range p.Cache {
		r.step(EvShardDone{Phase: protocol.PhaseCache, Shard: s.ID})
		r.step(EvShardDone{Phase: protocol.PhaseCache, Shard: s.ID}) // a duplicate is ignored
	}
	if !r.finished || r.students != 1 || r.failed != "" || r.core.Phase() != protocol.PhaseDone {
		t.Fatalf("finished %v students %d failed %q phase %s", r.finished, r.students, r.failed, r.core.Phase())
	}
}

func TestCoreDeadShardFails(t *testing.T) {
	p := testPlan(t, 10, 10, 4)
	r := newRecorder(NewCore(p, time.Minute, false))
	r.step(EvStart{})
	r.step(EvShardDead{Phase: protocol.PhaseStats, Shard: 1, Reason: "boom"})
	if r.failed == "" {
		t.Fatal("a dead shard did not fail the run")
	}
	r2 := newRecorder(NewCore(p, time.Minute, false))
	r2.step(EvStart{Restored: r.restored()})
	if r2.failed == "" {
		t.Fatal("a restarted core forgot the dead shard")
	}
}

func TestCoreLeases(t *testing.T) {
	p := testPlan(t, 10, 10, 4)
	c := NewCore(p, 10*time.Second, false)
	r := newRecorder(c)
	r.step(EvStart{})
	t0 := time.Unix(1000, 0)
	r.step(EvProgress{Phase: protocol.PhaseStats, Shard: 0, Teacher: "a", Tokens: 5, Now: t0})
	if n := c.Counts(protocol.PhaseStats)[StatusLeased]; n != 1 {
		t.Fatalf("leased = %d", n)
	}
	r.step(EvTick{Now: t0.Add(9 * time.Second)})
	if n := c.Counts(protocol.PhaseStats)[StatusLeased]; n != 1 {
		t.Fatalf("lease expired early")
	}
	r.step(EvTick{Now: t0.Add(10 * time.Second)})
	if n := c.Counts(protocol.PhaseStats)[StatusLeased]; n != 0 {
		t.Fatalf("lease did not expire")
	}
}

// TestCoreRestartProperty drives random interleavings with restarts from the persisted
// states. A shard first has its data published (its done marker stored in the data stream),
// later its consumer records it done. Every shard completes, no shard whose data was
// published is ever published again after a restart, the patch is fitted before any cache
// task, and the run finishes.
func TestCoreRestartProperty(t *testing.T) {
	for seed := range uint64(200) {
		rng := rand.New(rand.NewPCG(seed, 1))
		p := testPlan(t, 1+rng.IntN(60), 2+rng.IntN(120), 1+rng.IntN(16))
		r := newRecorder(NewCore(p, time.Minute, rng.IntN(2) == 0))
		r.step(EvStart{})
		marked, done := map[string]bool{}, map[string]bool{}
		var markedRefs []ShardRef
		for steps := 0; !r.finished && steps < 10000; steps++ {
			ph := r.core.Phase()
			if rng.IntN(10) == 0 { // crash and restart
				prev := r.persisted
				r = newRecorder(NewCore(p, time.Minute, r.core.student))
				r.persisted = prev
				r.step(EvStart{Restored: r.restored(), Marked: markedRefs})
				for ph, ids := range r.published {
					for id := range ids {
						if marked[ShardKey(ph, id)] {
							t.Fatalf("seed %d: restarted core republished %s shard %d, whose data was published", seed, ph, id)
						}
					}
				}
				continue
			}
			shards := p.Shards(ph)
			if len(shards) == 0 {
				continue
			}
			s := shards[rng.IntN(len(shards))]
			if ph == protocol.PhaseCache && r.fits == 0 && len(r.published[protocol.PhaseCache]) > 0 && !done[ShardKey(protocol.PhaseStats, 0)] {
				t.Fatalf("seed %d: cache tasks before the stats phase completed", seed)
			}
			if key := ShardKey(ph, s.ID); !marked[key] {
				marked[key] = true
				markedRefs = append(markedRefs, ShardRef{Phase: ph, ID: s.ID})
				continue
			}
			r.step(EvShardDone{Phase: ph, Shard: s.ID})
			done[ShardKey(ph, s.ID)] = true
		}
		if !r.finished {
			t.Fatalf("seed %d: run did not finish", seed)
		}
		for _, ph := range []protocol.Phase{protocol.PhaseStats, protocol.PhaseCache} {
			for _, s := range p.Shards(ph) {
				if st := r.persisted[ShardKey(ph, s.ID)]; st.Status != StatusDone {
					t.Fatalf("seed %d: %s shard %d ended %q", seed, ph, s.ID, st.Status)
				}
			}
		}
	}
}

// TestCoreRestartWaitsForMarkedShards: a restarted core does not publish the task of a
// shard whose data is already in the stream, yet does not leave the phase before the
// shard's consumer records it done.
func TestCoreRestartWaitsForMarkedShards(t *testing.T) {
	p := testPlan(t, 10, 10, 4)
	r := newRecorder(NewCore(p, time.Minute, false))
	r.step(EvStart{Marked: []ShardRef{{Phase: protocol.PhaseStats, ID: 1}}})
	if got := r.published[protocol.PhaseStats]; len(got) != len(p.Stats)-1 || got[1] != 0 {
		t.Fatalf("published stats tasks %v: want all but shard 1", got)
	}
	for _, s := range p.Stats {
		if s.ID != 1 {
			r.step(EvShardDone{Phase: protocol.PhaseStats, Shard: s.ID})
		}
	}
	if r.fits != 0 || r.core.Phase() != protocol.PhaseStats {
		t.Fatalf("fitted %d times in phase %s before the marked shard was done", r.fits, r.core.Phase())
	}
	r.step(EvShardDone{Phase: protocol.PhaseStats, Shard: 1})
	if r.fits != 1 || len(r.published[protocol.PhaseCache]) != len(p.Cache) {
		t.Fatalf("fits %d, cache tasks %d", r.fits, len(r.published[protocol.PhaseCache]))
	}
}

func TestStatesOrder(t *testing.T) {
	p := testPlan(t, 10, 10, 4)
	c := NewCore(p, time.Minute, false)
	var keys []string
	for _, s := range c.States() {
		keys = append(keys, s.Key())
	}
	want := []string{"shard.stats.000000", "shard.stats.000001", "shard.stats.000002",
		"shard.cache.000000", "shard.cache.000001", "shard.cache.000002", "shard.cache.000003"}
	if !reflect.DeepEqual(keys, want) {
		t.Fatalf("States order %v, want %v", keys, want)
	}
}
