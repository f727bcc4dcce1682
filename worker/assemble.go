package worker

import (
	"encoding/json"
	"fmt"
	"sort"
)

// Part is one data message held by an Assembler until its shard is complete.
type Part struct {
	Key  DataKey
	Data []byte
	Msg  Msg // to ack once the shard is durable
}

// Assembled is a complete shard: its parts in (window, chunk) order, the done marker's
// payload, and every delivery to ack (duplicates included) once the shard is durable.
type Assembled struct {
	Phase string
	Shard int
	Parts []Part
	Done  []byte // the done marker's payload
	Acks  []Msg
}

// doneCount is the field of a done marker's JSON payload an Assembler reads.
type doneCount struct {
	Messages int `json:"messages"`
}

// Assembler groups a phase's data messages by shard, drops duplicates by (shard, window,
// chunk), and hands out a shard once its done marker has arrived and every message the
// marker counts is present. It owns no goroutine and does no I/O; it is not safe for
// concurrent use. Completed shards are remembered so late redeliveries are recognized.
type Assembler struct {
	names    Names
	phase    string
	pending  map[int]*pendingShard
	complete map[int]bool
}

type pendingShard struct {
	parts    map[[2]int]Part
	done     []byte
	expected int // -1 until the marker arrives
	acks     []Msg
}

// NewAssembler returns an assembler for the data messages of phase.
func NewAssembler(names Names, phase string) *Assembler {
	return &Assembler{names: names, phase: phase, pending: map[int]*pendingShard{}, complete: map[int]bool{}}
}

// MarkComplete records that shard is already durable (e.g. found in a manifest after a
// restart); its messages will be returned by Add as Stale.
func (a *Assembler) MarkComplete(shard int) { a.complete[shard] = true }

// Outcome is what Add did with a message.
type Outcome int

const (
	Held      Outcome = iota // kept until its shard completes
	Duplicate                // a second copy of a held message; ack it with the shard
	Stale                    // its shard is already complete: ack it now
	Completed                // it completed its shard: see the returned Assembled
)

// Add takes one delivery. It returns an error (and keeps nothing) for a subject that is not
// a data subject of this run and phase, or a done marker whose payload is not valid; the
// caller should Term such a message. Data is kept, not copied.
func (a *Assembler) Add(m Msg) (Outcome, *Assembled, error) {
	k, err := a.names.ParseDataSubject(m.Subject)
	if err != nil {
		return 0, nil, err
	}
	if k.Phase != a.phase {
		return 0, nil, fmt.Errorf("%w: %q is not of phase %s", ErrInvalidSubject, m.Subject, a.phase)
	}
	if a.complete[k.Shard] {
		return Stale, nil, nil
	}
	p := a.pending[k.Shard]
	if p == nil {
		p = &pendingShard{parts: map[[2]int]Part{}, expected: -1}
		a.pending[k.Shard] = p
	}
	outcome := Held
	if k.Done {
		var dc doneCount
		if err := json.Unmarshal(m.Data, &dc); err != nil || dc.Messages < 0 {
			return 0, nil, fmt.Errorf("worker: bad done marker on %s: %v", m.Subject, err)
		}
		if p.expected >= 0 {
			outcome = Duplicate
		}
		p.done, p.expected = m.Data, dc.Messages
	} else {
		key := [2]int{k.Window, k.Chunk}
		if _, ok := p.parts[key]; ok {
			outcome = Duplicate
		} else {
			p.parts[key] = Part{Key: k, Data: m.Data, Msg: m}
		}
	}
	if outcome == Duplicate {
		// Only its ack is needed: a shard slower than the consumer's AckWait is redelivered
		// whole every AckWait, and keeping each copy's bytes would multiply its memory.
		m.Data, m.Header = nil, nil
	}
	p.acks = append(p.acks, m)
	if p.expected < 0 || len(p.parts) < p.expected {
		return outcome, nil, nil
	}
	if len(p.parts) > p.expected {
		// More distinct messages than the marker counts: a teacher disagreed with itself.
		// Drop the shard's state; redeliveries (after AckWait) rebuild it.
		delete(a.pending, k.Shard)
		return 0, nil, fmt.Errorf("worker: shard %d of %s has %d distinct messages, its done marker says %d", k.Shard, a.phase, len(p.parts), p.expected)
	}
	out := &Assembled{Phase: a.phase, Shard: k.Shard, Done: p.done, Acks: p.acks}
	for _, part := range p.parts {
		out.Parts = append(out.Parts, part)
	}
	sort.Slice(out.Parts, func(i, j int) bool {
		x, y := out.Parts[i].Key, out.Parts[j].Key
		if x.Window != y.Window {
			return x.Window < y.Window
		}
		return x.Chunk < y.Chunk
	})
	delete(a.pending, k.Shard)
	a.complete[k.Shard] = true
	return Completed, out, nil
}

// Forget drops a completed shard's record, so its messages are assembled again (used when
// a shard turned out to be invalid and must be recomputed).
func (a *Assembler) Forget(shard int) {
	delete(a.complete, shard)
	delete(a.pending, shard)
}

// Pending returns the number of shards with messages held.
func (a *Assembler) Pending() int { return len(a.pending) }
