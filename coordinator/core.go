package coordinator

import (
	"fmt"
	"sort"
	"time"

	"linearpatch/protocol"
)

// ShardStatus is where a shard stands.
type ShardStatus string

const (
	StatusPending ShardStatus = "pending" // task published (or to be), no teacher on it
	StatusLeased  ShardStatus = "leased"  // a teacher reported work on it within its lease
	StatusDone    ShardStatus = "done"    // its data is durable and verified
	StatusDead    ShardStatus = "dead"    // every delivery failed; the run cannot complete
)

// ShardState is the persisted state of one shard.
type ShardState struct {
	Phase    protocol.Phase `json:"phase"`
	ID       int            `json:"id"`
	Status   ShardStatus    `json:"status"`
	Teacher  string         `json:"teacher,omitempty"`  // last teacher seen working on it
	LeaseEnd time.Time      `json:"lease_end,omitzero"` // when the lease runs out without news
	Tokens   int64          `json:"tokens,omitempty"`   // tokens done (progress or final)
	Rows     int            `json:"rows,omitempty"`
	Bytes    int64          `json:"bytes,omitempty"`
	SHA256   string         `json:"sha256,omitempty"`
	File     string         `json:"file,omitempty"`
	Reason   string         `json:"reason,omitempty"` // why it is dead
}

// Key is the shard's key in the state store: "shard.<phase>.<id>".
func (s ShardState) Key() string { return ShardKey(s.Phase, s.ID) }

// ShardKey is the state-store key of a shard.
func ShardKey(ph protocol.Phase, id int) string { return fmt.Sprintf("shard.%s.%06d", ph, id) }

// Event is something that happened, fed to Core.Step.
type Event interface{ isEvent() }

// EvStart (re)starts the core. Restored holds the shard states read back from the store;
// Marked the shards whose records are already all in the data stream (their done marker is
// stored), read before the store: their tasks are not published again, the consumer of the
// data will record them done.
type EvStart struct {
	Restored []ShardState
	Marked   []ShardRef
}

// ShardRef names one shard of a phase.
type ShardRef struct {
	Phase protocol.Phase
	ID    int
}

// EvProgress is a teacher's report that it works on a shard (a lease renewal).
type EvProgress struct {
	Phase   protocol.Phase
	Shard   int
	Teacher string
	Tokens  int64
	Now     time.Time
}

// EvShardDone says a shard's data is durable and verified.
type EvShardDone struct {
	Phase                protocol.Phase
	Shard                int
	Rows                 int
	Tokens, Bytes        int64
	SHA256, File, Source string
}

// EvShardDead says a shard's task exhausted its deliveries.
type EvShardDead struct {
	Phase  protocol.Phase
	Shard  int
	Reason string
}

// EvFitted says the training-free patch of the stats phase is fitted and stored.
type EvFitted struct{}

// EvStudentDone says the student finished and exported its result.
type EvStudentDone struct{}

// EvTick lets the core expire leases.
type EvTick struct{ Now time.Time }

func (EvStart) isEvent()       {}
func (EvProgress) isEvent()    {}
func (EvShardDone) isEvent()   {}
func (EvShardDead) isEvent()   {}
func (EvFitted) isEvent()      {}
func (EvStudentDone) isEvent() {}
func (EvTick) isEvent()        {}

// Action is something the driver must do, returned by Core.Step in order.
type Action interface{ isAction() }

// ActPersist writes the shard states to the store (before any later action).
type ActPersist struct{ States []ShardState }

// ActPersistPhase writes the current phase to the store.
type ActPersistPhase struct{ Phase protocol.Phase }

// ActPublishTasks publishes the tasks of these shards (idempotent: task ids are stable).
type ActPublishTasks struct {
	Phase  protocol.Phase
	Shards []protocol.Shard
}

// ActFit merges the stats shards in plan order, selects the block and fits the patch; the
// driver answers with EvFitted.
type ActFit struct{}

// ActStartStudent starts the distillation (when the run has one); the driver answers with
// EvStudentDone.
type ActStartStudent struct{}

// ActFinish ends the run successfully.
type ActFinish struct{}

// ActFail ends the run with an error.
type ActFail struct{ Reason string }

func (ActPersist) isAction()      {}
func (ActPersistPhase) isAction() {}
func (ActPublishTasks) isAction() {}
func (ActFit) isAction()          {}
func (ActStartStudent) isAction() {}
func (ActFinish) isAction()       {}
func (ActFail) isAction()         {}

// Core is the coordinator's deterministic decision logic: given the plan and a stream of
// events, it returns the actions to take. It has no clock and does no I/O; time arrives in
// events. Not safe for concurrent use.
type Core struct {
	plan    *protocol.Plan
	lease   time.Duration
	student bool // the run continues with distillation after the cache phase
	phase   protocol.Phase
	shards  map[string]*ShardState
	fitted  bool
	started bool
	marked  map[string]bool // shards whose data is all published: never republish their tasks
}

// NewCore returns a core for plan. lease is how long a shard counts as leased after a
// teacher's last progress report; student says whether the run distills after caching.
func NewCore(plan *protocol.Plan, lease time.Duration, student bool) *Core {
	c := &Core{plan: plan, lease: lease, student: student, phase: protocol.PhaseStats, shards: map[string]*ShardState{},
		marked: map[string]bool{}}
	for _, ph := range []protocol.Phase{protocol.PhaseStats, protocol.PhaseCache} {
		for _, s := range plan.Shards(ph) {
			st := &ShardState{Phase: ph, ID: s.ID, Status: StatusPending}
			c.shards[st.Key()] = st
		}
	}
	return c
}

// Phase returns the current phase.
func (c *Core) Phase() protocol.Phase { return c.phase }

// States returns copies of all shard states in plan order (stats, then cache).
func (c *Core) States() []ShardState {
	out := make([]ShardState, 0, len(c.shards))
	for _, s := range c.shards {
		out = append(out, *s)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Phase != out[j].Phase {
			return out[i].Phase == protocol.PhaseStats
		}
		return out[i].ID < out[j].ID
	})
	return out
}

// Counts returns how many shards of a phase are in each status.
func (c *Core) Counts(ph protocol.Phase) map[ShardStatus]int {
	n := map[ShardStatus]int{}
	for _, s := range c.shards {
		if s.Phase == ph {
			n[s.Status]++
		}
	}
	return n
}

// Step applies one event and returns the actions it calls for.
func (c *Core) Step(ev Event) []Action {
	switch e := ev.(type) {
	case EvStart:
		return c.start(e)
	case EvProgress:
		s := c.shards[ShardKey(e.Phase, e.Shard)]
		if s == nil || s.Status == StatusDone || s.Status == StatusDead {
			return nil
		}
		s.Status, s.Teacher, s.Tokens, s.LeaseEnd = StatusLeased, e.Teacher, e.Tokens, e.Now.Add(c.lease)
		return nil // progress is not persisted: a restarted coordinator relearns it
	case EvShardDone:
		s := c.shards[ShardKey(e.Phase, e.Shard)]
		if s == nil || s.Status == StatusDone {
			return nil // unknown or already complete: a late duplicate
		}
		*s = ShardState{Phase: e.Phase, ID: e.Shard, Status: StatusDone, Teacher: e.Source, Rows: e.Rows,
			Tokens: e.Tokens, Bytes: e.Bytes, SHA256: e.SHA256, File: e.File}
		return append([]Action{ActPersist{States: []ShardState{*s}}}, c.advance()...)
	case EvShardDead:
		s := c.shards[ShardKey(e.Phase, e.Shard)]
		if s == nil || s.Status == StatusDone {
			return nil
		}
		s.Status, s.Reason = StatusDead, e.Reason
		return []Action{ActPersist{States: []ShardState{*s}},
			ActFail{Reason: fmt.Sprintf("%s shard %d failed on every delivery: %s", e.Phase, e.Shard, e.Reason)}}
	case EvFitted:
		if c.phase != protocol.PhaseStats || c.fitted {
			return nil
		}
		c.fitted = true
		return c.enter(protocol.PhaseCache)
	case EvStudentDone:
		if c.phase != protocol.PhaseStudent {
			return nil
		}
		return c.enter(protocol.PhaseDone)
	case EvTick:
		for _, s := range c.shards {
			if s.Status == StatusLeased && !e.Now.Before(s.LeaseEnd) {
				s.Status, s.LeaseEnd = StatusPending, time.Time{}
			}
		}
		return nil
	}
	panic(fmt.Sprintf("coordinator: unknown event %T", ev))
}

// start restores persisted states and resumes the phase they imply.
func (c *Core) start(e EvStart) []Action {
	if c.started {
		return nil
	}
	c.started = true
	for _, r := range e.Restored {
		if s := c.shards[r.Key()]; s != nil && (r.Status == StatusDone || r.Status == StatusDead) {
			*s = r
		}
	}
	for _, m := range e.Marked {
		c.marked[ShardKey(m.Phase, m.ID)] = true
	}
	for _, s := range c.shards {
		if s.Status == StatusDead {
			return []Action{ActFail{Reason: fmt.Sprintf("%s shard %d is dead: %s", s.Phase, s.ID, s.Reason)}}
		}
	}
	return c.enter(protocol.PhaseStats)
}

// enter moves to phase ph and returns what starting it takes; a phase with nothing left to
// do is passed through at once.
func (c *Core) enter(ph protocol.Phase) []Action {
	c.phase = ph
	acts := []Action{ActPersistPhase{Phase: ph}}
	switch ph {
	case protocol.PhaseStats, protocol.PhaseCache:
		pending := c.pending(ph)
		if len(pending) == 0 {
			return append(acts, c.advance()...)
		}
		var publish []protocol.Shard
		for _, s := range pending {
			if !c.marked[ShardKey(ph, s.ID)] {
				publish = append(publish, s)
			}
		}
		if len(publish) > 0 {
			acts = append(acts, ActPublishTasks{Phase: ph, Shards: publish})
		}
		return acts
	case protocol.PhaseStudent:
		return append(acts, ActStartStudent{})
	case protocol.PhaseDone:
		return append(acts, ActFinish{})
	}
	return acts
}

// advance reports what follows when the current phase may be complete.
func (c *Core) advance() []Action {
	if len(c.pending(c.phase)) > 0 {
		return nil
	}
	switch c.phase {
	case protocol.PhaseStats:
		if c.fitted {
			return c.enter(protocol.PhaseCache)
		}
		return []Action{ActFit{}}
	case protocol.PhaseCache:
		if c.student {
			return c.enter(protocol.PhaseStudent)
		}
		return c.enter(protocol.PhaseDone)
	}
	return nil
}

// pending returns the shards of ph that are not done, in plan order.
func (c *Core) pending(ph protocol.Phase) []protocol.Shard {
	var out []protocol.Shard
	for _, s := range c.plan.Shards(ph) {
		if c.shards[ShardKey(ph, s.ID)].Status != StatusDone {
			out = append(out, s)
		}
	}
	return out
}
