// Package studentnet is the NATS JetStream implementation of student.StepExchange: the
// meeting place of the students that share a run's optimizer steps. It is a package of
// its own (not package student, which stays free of NATS, nor the CLI) so that it can be
// tested against an embedded server on its own and used by every command that runs
// students.
//
// Layout, in the run's bucket (worker.Names.KVBucket) and gradient store
// (worker.Names.GradStore):
//
//	students.claim.<step>.<pos>   claim of window pos of step: {"holder", "done"}; its revision is the lease's clock
//	students.checkpoint           the latest checkpoint: {"step", "done", "object", "pruned"}
//	students.saving.<step>        the student saving step's periodic checkpoint (created once)
//	students.live.<holder>        a student's report (Report), for status
//	object grad.<step>.<pos>      the window's gradient, d×d float32 little-endian; loss and shard in its metadata
//	object ckpt.<step>[.done]     a checkpoint (student.Checkpoint's format)
package studentnet

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"linearpatch/student"
	"linearpatch/worker"
)

// Key and object names (see the package comment).
const (
	KeyCheckpoint = worker.StudentsKeyPrefix + "checkpoint"
	keyClaim      = worker.StudentsKeyPrefix + "claim."
	keySaving     = worker.StudentsKeyPrefix + "saving."
	KeyLivePrefix = worker.StudentsKeyPrefix + "live."
)

func claimKey(step, pos int) string { return fmt.Sprintf("%s%d.%d", keyClaim, step, pos) }
func gradObject(step, pos int) string {
	return fmt.Sprintf("grad.%d.%d", step, pos)
}

// Exchange is a student.StepExchange on a run's bucket and gradient store.
type Exchange struct {
	kv    jetstream.KeyValue
	obj   jetstream.ObjectStore
	batch int // windows per step: the positions pruning deletes

	up, down atomic.Int64 // gradient bytes stored and fetched

	watchStep int // the step watched (-1: none)
	watcher   jetstream.KeyWatcher
}

// Open returns the exchange of run names on js (the bucket and the gradient store must
// exist: worker.Setup creates them); batch is the run's windows per step.
func Open(ctx context.Context, js jetstream.JetStream, names worker.Names, batch int) (*Exchange, error) {
	if batch < 1 {
		return nil, fmt.Errorf("studentnet: batch %d", batch)
	}
	kv, err := js.KeyValue(ctx, names.KVBucket())
	if err != nil {
		return nil, fmt.Errorf("studentnet: the run's bucket: %w", err)
	}
	obj, err := js.ObjectStore(ctx, names.GradStore())
	if err != nil {
		return nil, fmt.Errorf("studentnet: the run's gradient store %s (a coordinator of this version creates it): %w", names.GradStore(), err)
	}
	return &Exchange{kv: kv, obj: obj, batch: batch, watchStep: -1}, nil
}

// Bytes returns the gradient bytes this exchange stored and fetched so far.
func (x *Exchange) Bytes() (up, down int64) { return x.up.Load(), x.down.Load() }

type claimValue struct {
	Holder string `json:"holder"`
	Done   bool   `json:"done,omitempty"`
}

func claimBytes(holder string, done bool) []byte {
	b, _ := json.Marshal(claimValue{Holder: holder, Done: done})
	return b
}

// casConflict reports whether err is a failed compare-and-swap of a KV write.
func casConflict(err error) bool {
	return errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch)
}

// Claim implements student.StepExchange.
func (x *Exchange) Claim(ctx context.Context, step, pos int) (student.Claim, bool, error) {
	e, err := x.kv.Get(ctx, claimKey(step, pos))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return student.Claim{}, false, nil
	}
	if err != nil {
		return student.Claim{}, false, err
	}
	var v claimValue
	if err := json.Unmarshal(e.Value(), &v); err != nil {
		return student.Claim{}, false, fmt.Errorf("studentnet: claim %s: %w", e.Key(), err)
	}
	return student.Claim{Holder: v.Holder, Rev: e.Revision(), Done: v.Done}, true, nil
}

// CreateClaim implements student.StepExchange.
func (x *Exchange) CreateClaim(ctx context.Context, step, pos int, holder string) (uint64, error) {
	rev, err := x.kv.Create(ctx, claimKey(step, pos), claimBytes(holder, false))
	if casConflict(err) {
		return 0, student.ErrClaimTaken
	}
	return rev, err
}

// UpdateClaim implements student.StepExchange.
func (x *Exchange) UpdateClaim(ctx context.Context, step, pos int, holder string, rev uint64) (uint64, error) {
	nrev, err := x.kv.Update(ctx, claimKey(step, pos), claimBytes(holder, false), rev)
	if casConflict(err) {
		return 0, student.ErrClaimTaken
	}
	return nrev, err
}

// Publish implements student.StepExchange: the gradient object (its loss, as the float64's
// bits, and shard in its metadata), then the claim marked done.
func (x *Exchange) Publish(ctx context.Context, step, pos int, holder string, g student.WindowGrad) error {
	b := make([]byte, 0, 4*len(g.Grad))
	for _, v := range g.Grad {
		b = binary.LittleEndian.AppendUint32(b, math.Float32bits(v))
	}
	meta := jetstream.ObjectMeta{Name: gradObject(step, pos), Metadata: map[string]string{
		"shard": strconv.Itoa(g.Ref.Shard), "window": strconv.Itoa(g.Ref.Index),
		"loss": strconv.FormatUint(math.Float64bits(g.Loss), 16), "shard_sha256": g.ShardSHA256, "fingerprint": g.Fingerprint}}
	if _, err := x.obj.Put(ctx, meta, bytes.NewReader(b)); err != nil {
		return fmt.Errorf("studentnet: storing the gradient of window %d of step %d: %w", pos, step+1, err)
	}
	x.up.Add(int64(len(b)))
	if _, err := x.kv.Put(ctx, claimKey(step, pos), claimBytes(holder, true)); err != nil {
		return fmt.Errorf("studentnet: marking window %d of step %d done: %w", pos, step+1, err)
	}
	return nil
}

// Fetch implements student.StepExchange.
func (x *Exchange) Fetch(ctx context.Context, step, pos int, ref student.WindowRef) (student.WindowGrad, error) {
	name := gradObject(step, pos)
	stored, err := x.obj.GetInfo(ctx, name)
	if err != nil {
		return student.WindowGrad{}, fmt.Errorf("studentnet: gradient %s: %w", name, err)
	}
	ctx, cancel := worker.ObjectContext(ctx, stored.Size)
	defer cancel()
	r, err := x.obj.Get(ctx, name)
	if err != nil {
		return student.WindowGrad{}, fmt.Errorf("studentnet: gradient %s: %w", name, err)
	}
	defer r.Close()
	info, err := r.Info()
	if err != nil {
		return student.WindowGrad{}, err
	}
	md := info.Metadata
	shard, err1 := strconv.Atoi(md["shard"])
	window, err2 := strconv.Atoi(md["window"])
	lossBits, err3 := strconv.ParseUint(md["loss"], 16, 64)
	if err := errors.Join(err1, err2, err3); err != nil {
		return student.WindowGrad{}, fmt.Errorf("studentnet: gradient %s: metadata %v: %w", name, md, err)
	}
	if got := (student.WindowRef{Shard: shard, Index: window}); got != ref {
		return student.WindowGrad{}, fmt.Errorf("studentnet: gradient %s is of window %+v, the step's is %+v", name, got, ref)
	}
	b, err := x.read(ctx, name, r, info.Size)
	if err != nil {
		return student.WindowGrad{}, err
	}
	if len(b)%4 != 0 {
		return student.WindowGrad{}, fmt.Errorf("studentnet: gradient %s holds %d bytes", name, len(b))
	}
	g := make([]float32, len(b)/4)
	for i := range g {
		g[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
	x.down.Add(int64(len(b)))
	return student.WindowGrad{Ref: ref, Grad: g, Loss: math.Float64frombits(lossBits), ShardSHA256: md["shard_sha256"],
		Fingerprint: md["fingerprint"]}, nil
}

// deletedPoll is how often a gradient being read is checked for deletion.
const deletedPoll = 100 * time.Millisecond

// read reads the gradient object name from r. The students ahead delete the gradients of
// old steps once they checkpoint, and a read whose object is deleted under it waits for
// chunks that never come (the client gives up after its 5 s timeout): so the read is
// watched, and it fails as soon as the object is gone — the driver then loads the newer
// checkpoint instead of stalling behind the others.
func (x *Exchange) read(ctx context.Context, name string, r jetstream.ObjectResult, size uint64) ([]byte, error) {
	type result struct {
		b   []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		var buf bytes.Buffer
		buf.Grow(int(size))
		_, err := buf.ReadFrom(r)
		done <- result{buf.Bytes(), err}
	}()
	tick := time.NewTicker(deletedPoll)
	defer tick.Stop()
	for {
		select {
		case res := <-done:
			if res.err != nil {
				return nil, fmt.Errorf("studentnet: gradient %s: %w", name, res.err)
			}
			return res.b, nil
		case <-ctx.Done():
			return nil, fmt.Errorf("studentnet: gradient %s: %w", name, ctx.Err())
		case <-tick.C:
			if _, err := x.obj.GetInfo(ctx, name); errors.Is(err, jetstream.ErrObjectNotFound) {
				return nil, fmt.Errorf("studentnet: gradient %s was deleted while it was read (the other students checkpointed past its step): %w", name, err)
			}
		}
	}
}

type pointer struct {
	Step   int    `json:"step"`
	Done   bool   `json:"done"`
	Object string `json:"object"`
	Pruned int    `json:"pruned"` // the claims and gradients of the steps below are deleted
}

// keepSteps is how many steps before the latest checkpoint keep their gradients: students
// a step or two behind finish them without recomputing.
const keepSteps = 2

func (x *Exchange) pointer(ctx context.Context) (pointer, uint64, bool, error) {
	e, err := x.kv.Get(ctx, KeyCheckpoint)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return pointer{}, 0, false, nil
	}
	if err != nil {
		return pointer{}, 0, false, err
	}
	var p pointer
	if err := json.Unmarshal(e.Value(), &p); err != nil {
		return pointer{}, 0, false, fmt.Errorf("studentnet: %s: %w", KeyCheckpoint, err)
	}
	return p, e.Revision(), true, nil
}

// newer reports whether a checkpoint at step (done) replaces p.
func newer(step int, done bool, p pointer) bool {
	return step > p.Step || (step == p.Step && done && !p.Done)
}

// SaveCheckpoint implements student.StepExchange. A periodic checkpoint is saved by the
// first student that creates its students.saving key; the final one by any student that
// finds none. The object is stored first, then the pointer moved by compare-and-swap; then
// the previous pointer's object and the claims and gradients of the steps before
// ck.Step−2 are deleted.
func (x *Exchange) SaveCheckpoint(ctx context.Context, ck *student.Checkpoint) error {
	p, _, ok, err := x.pointer(ctx)
	if err != nil {
		return err
	}
	if ok && !newer(ck.Step, ck.Done, p) {
		return nil
	}
	if !ck.Done {
		if _, err := x.kv.Create(ctx, fmt.Sprintf("%s%d", keySaving, ck.Step), []byte("1")); casConflict(err) {
			return nil // another student saves this one
		} else if err != nil {
			return err
		}
	}
	b, err := ck.MarshalBinary()
	if err != nil {
		return err
	}
	name := fmt.Sprintf("ckpt.%d", ck.Step)
	if ck.Done {
		name += ".done"
	}
	if _, err := x.obj.PutBytes(ctx, name, b); err != nil {
		return fmt.Errorf("studentnet: storing the checkpoint of step %d: %w", ck.Step, err)
	}
	for {
		p, rev, ok, err := x.pointer(ctx)
		if err != nil {
			return err
		}
		if ok && !newer(ck.Step, ck.Done, p) {
			if p.Object != name {
				_ = x.obj.Delete(ctx, name)
			}
			return nil
		}
		np := pointer{Step: ck.Step, Done: ck.Done, Object: name, Pruned: max(p.Pruned, ck.Step-keepSteps)}
		v, _ := json.Marshal(np)
		if ok {
			_, err = x.kv.Update(ctx, KeyCheckpoint, v, rev)
		} else {
			_, err = x.kv.Create(ctx, KeyCheckpoint, v)
		}
		if casConflict(err) {
			continue
		}
		if err != nil {
			return fmt.Errorf("studentnet: moving the checkpoint pointer to step %d: %w", ck.Step, err)
		}
		if ok {
			if p.Object != name {
				_ = x.obj.Delete(ctx, p.Object)
			}
		}
		x.prune(ctx, p.Pruned, np.Pruned)
		return nil
	}
}

// prune deletes the claims, saving keys and gradients of steps [from, to); what fails is
// left (a later prune does not retry it; the run's purge removes it).
func (x *Exchange) prune(ctx context.Context, from, to int) {
	for step := from; step < to; step++ {
		for pos := range x.batch {
			_ = x.obj.Delete(ctx, gradObject(step, pos))
			_ = x.kv.Purge(ctx, claimKey(step, pos))
		}
		_ = x.kv.Purge(ctx, fmt.Sprintf("%s%d", keySaving, step))
	}
}

// LatestCheckpoint implements student.StepExchange.
func (x *Exchange) LatestCheckpoint(ctx context.Context) (int, bool, bool, error) {
	p, _, ok, err := x.pointer(ctx)
	return p.Step, p.Done, ok, err
}

// LoadCheckpoint implements student.StepExchange. A checkpoint replaced while it was read
// is read again from the new pointer.
func (x *Exchange) LoadCheckpoint(ctx context.Context) (*student.Checkpoint, error) {
	var last error
	for range 5 {
		p, _, ok, err := x.pointer(ctx)
		if err != nil {
			return nil, err
		}
		if !ok {
			return nil, student.ErrNoCheckpoint
		}
		b, _, err := worker.GetObject(ctx, x.obj, p.Object)
		if err == nil {
			return student.UnmarshalCheckpoint(b)
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		last = err
	}
	return nil, fmt.Errorf("studentnet: loading the checkpoint: %w", last)
}

// WaitStep implements student.StepWaiter with a watch on the step's claims (one at a time,
// replaced when the step changes; a change made before the watch began is seen at the
// next poll). Not safe for concurrent use: one student per Exchange.
func (x *Exchange) WaitStep(ctx context.Context, step int, d time.Duration) error {
	if x.watchStep != step {
		x.Close()
		w, err := x.kv.Watch(ctx, fmt.Sprintf("%s%d.*", keyClaim, step), jetstream.UpdatesOnly())
		if err == nil {
			x.watcher, x.watchStep = w, step
		}
	}
	t := time.NewTimer(d)
	defer t.Stop()
	var updates <-chan jetstream.KeyValueEntry
	if x.watcher != nil {
		updates = x.watcher.Updates()
	}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			return nil
		case e, ok := <-updates:
			switch {
			case !ok: // the watch ended: poll until the next step's
				x.watcher, updates = nil, nil
			case e != nil: // nil marks the end of the initial values
				return nil
			}
		}
	}
}

// Close stops the exchange's watch, if any.
func (x *Exchange) Close() {
	if x.watcher != nil {
		_ = x.watcher.Stop()
		x.watcher, x.watchStep = nil, -1
	}
}

var (
	_ student.StepExchange = (*Exchange)(nil)
	_ student.StepWaiter   = (*Exchange)(nil)
)
