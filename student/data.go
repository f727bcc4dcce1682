package student

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"path/filepath"
	"time"

	"linearpatch/shards"
)

// Errors about the training data.
var (
	// ErrData: the shard files do not match the plan (split, window count, window length,
	// incomplete windows, cut or width).
	ErrData = errors.New("student: training data do not match the plan")
	// ErrShardMissing: a planned shard is not in the manifest and no waiting was configured
	// (see WithWaitFor and WithManifestPoll).
	ErrShardMissing = errors.New("student: shard not in the manifest")
)

// ManifestName is the manifest's file name inside a cache directory (cache.ManifestFile).
const ManifestName = "manifest.json"

// ShardSpec is one shard of the plan: its number in the manifest and the windows it holds.
type ShardSpec struct {
	Shard   int `json:"shard"`
	Windows int `json:"windows"`
}

// PlanFromManifest returns the train and valid shards listed in m, in shard order: the
// plan of a complete cache. (A pipeline that starts the student before the cache is
// complete passes the coordinator's plan instead.)
func PlanFromManifest(m *shards.Manifest) (train, valid []ShardSpec) {
	for _, e := range m.Shards {
		switch e.Split {
		case shards.SplitTrain:
			train = append(train, ShardSpec{e.Shard, e.Windows})
		case shards.SplitValid:
			valid = append(valid, ShardSpec{e.Shard, e.Windows})
		}
	}
	return train, valid
}

// WindowRef names a window by its shard and its index among the shard's windows in
// window order (not the global window index).
type WindowRef struct {
	Shard, Index int
}

// DataOption configures a ShardData.
type DataOption func(*dataOptions) error

type dataOptions struct {
	wait     func(ctx context.Context, shard int) error
	poll     time.Duration
	stall    time.Duration // give up polling after this long without a manifest change; 0: never
	log      *slog.Logger  // logs what a poll waits for; nil: silent
	logEvery time.Duration
}

// WithWaitFor makes every shard load first call wait(ctx, shard), which must return nil
// once the shard's file is complete and listed in the manifest, or an error (ctx.Err()
// when ctx ends). It may be called from the ShardData's background loader, for the shard
// after the one in use, so that training overlaps with the wait; it must be safe to call
// concurrently with the caller's other work.
func WithWaitFor(wait func(ctx context.Context, shard int) error) DataOption {
	return func(o *dataOptions) error {
		if wait == nil {
			return fmt.Errorf("%w: nil WaitFor", ErrOptions)
		}
		o.wait = wait
		return nil
	}
}

// WithManifestPoll makes a load of a shard (or of a manifest) that is not there yet re-read
// the manifest every interval until it appears or ctx ends, instead of failing with
// ErrShardMissing. The cache writer adds a shard's entry only once its file is complete.
func WithManifestPoll(interval time.Duration) DataOption {
	return func(o *dataOptions) error {
		if interval <= 0 {
			return fmt.Errorf("%w: manifest poll interval %v must be positive", ErrOptions, interval)
		}
		o.poll = interval
		return nil
	}
}

// WithManifestStall makes a manifest poll (see WithManifestPoll) log what it waits for to
// log, once it has waited min(5 s, logEvery, limit/2) and then every logEvery, and give up with an error wrapping ErrShardMissing
// once the manifest has not changed (no shard added, no file appeared) for limit: nothing
// is writing the cache any more, so the shard will never come. limit 0 waits until ctx
// ends; log may be nil.
func WithManifestStall(limit, logEvery time.Duration, log *slog.Logger) DataOption {
	return func(o *dataOptions) error {
		if limit < 0 || logEvery <= 0 {
			return fmt.Errorf("%w: manifest stall limit %v, log interval %v", ErrOptions, limit, logEvery)
		}
		o.stall, o.logEvery, o.log = limit, logEvery, log
		return nil
	}
}

// ShardData serves the windows of a distillation cache (a directory with manifest.json and
// shard files) in a deterministic order. The training order of an epoch is the plan's train
// shards in plan order, the windows of each shard shuffled by a PCG seeded from (seed,
// epoch, shard) (see Order): a function of the plan and the seed alone, never of when
// files arrive. Validation windows come in plan order, unshuffled.
//
// Every load reads the manifest, checks the entry against the plan (split, windows) and
// reads the file with its SHA-256 checked against the manifest's before anything is
// decoded: a mismatch is an error wrapping shards.ErrChecksum, and the shard is never
// served. It holds the shards the current batch needs plus one loaded ahead in the
// background. A ShardData is not safe for concurrent use.
type ShardData struct {
	dir          string
	meta         shards.Meta
	train, valid []ShardSpec
	trainN       int
	validN       int
	o            dataOptions
	byShard      map[int]shardPos

	cache map[int]*loadedShard
	ahead *prefetch // at most one background load
}

type shardPos struct {
	split string
	i     int // index in the split's spec list
}

// loadedShard holds a shard's windows in window order.
type loadedShard struct {
	shard   int
	sha     string
	windows []window
}

type window struct {
	id int // global window index
	ex Example
	n  int // tokens
}

type prefetch struct {
	shard  int
	cancel context.CancelFunc
	done   chan struct{}
	res    *loadedShard
	err    error
}

// NewShardData returns the data of the cache in dir for the plan: train and valid shards in
// the order the student consumes them (window counts are needed up front, so that the
// number of steps is known before the cache is complete). meta is the Meta every shard file
// must carry. Shard numbers must be unique and window counts positive; the manifest is not
// read until a shard is needed. Errors wrap ErrOptions.
func NewShardData(dir string, meta shards.Meta, train, valid []ShardSpec, opts ...DataOption) (*ShardData, error) {
	if err := meta.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrOptions, err)
	}
	d := &ShardData{dir: dir, meta: meta, train: append([]ShardSpec(nil), train...),
		valid: append([]ShardSpec(nil), valid...), byShard: map[int]shardPos{}, cache: map[int]*loadedShard{}}
	for _, o := range opts {
		if err := o(&d.o); err != nil {
			return nil, err
		}
	}
	for _, part := range []struct {
		split string
		specs []ShardSpec
		n     *int
	}{{shards.SplitTrain, d.train, &d.trainN}, {shards.SplitValid, d.valid, &d.validN}} {
		for i, s := range part.specs {
			if s.Shard < 0 || s.Windows < 1 {
				return nil, fmt.Errorf("%w: %s shard %d with %d windows", ErrOptions, part.split, s.Shard, s.Windows)
			}
			if _, dup := d.byShard[s.Shard]; dup {
				return nil, fmt.Errorf("%w: shard %d planned twice", ErrOptions, s.Shard)
			}
			d.byShard[s.Shard] = shardPos{part.split, i}
			*part.n += s.Windows
		}
	}
	if d.trainN == 0 {
		return nil, fmt.Errorf("%w: no training windows", ErrOptions)
	}
	if err := d.checkListed(); err != nil {
		return nil, err
	}
	return d, nil
}

// checkListed checks the planned shards that the manifest already lists against their
// entries (split, windows), so that a plan whose window counts disagree with the cache is
// refused before anything is sized by them (the training order holds every window). A
// manifest not there yet is not an error here: loads wait for it or fail.
func (d *ShardData) checkListed() error {
	m, err := shards.LoadManifest(filepath.Join(d.dir, ManifestName))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for shard, pos := range d.byShard {
		e, ok := m.Entry(shard)
		if !ok {
			continue
		}
		if spec := d.spec(pos); e.Split != pos.split || e.Windows != spec.Windows {
			return fmt.Errorf("%w: shard %d is a %s shard of %d windows in the manifest, planned as %s with %d",
				ErrData, shard, e.Split, e.Windows, pos.split, spec.Windows)
		}
	}
	return nil
}

// Meta returns the Meta the shard files must carry.
func (d *ShardData) Meta() shards.Meta { return d.meta }

// TrainWindows returns the number of training windows per epoch.
func (d *ShardData) TrainWindows() int { return d.trainN }

// ValidWindows returns the number of validation windows.
func (d *ShardData) ValidWindows() int { return d.validN }

// Plan returns copies of the train and valid shard lists.
func (d *ShardData) Plan() (train, valid []ShardSpec) {
	return append([]ShardSpec(nil), d.train...), append([]ShardSpec(nil), d.valid...)
}

// Order returns the training order of epoch (0-based) under seed: TrainWindows() refs.
// It depends on the plan, the seed and the epoch alone.
func (d *ShardData) Order(seed uint64, epoch int) []WindowRef {
	return trainOrder(d.train, seed, epoch)
}

func trainOrder(train []ShardSpec, seed uint64, epoch int) []WindowRef {
	var out []WindowRef
	for _, s := range train {
		for _, i := range shuffle(s.Windows, seed, epoch, s.Shard) {
			out = append(out, WindowRef{s.Shard, i})
		}
	}
	return out
}

func validOrder(valid []ShardSpec) []WindowRef {
	var out []WindowRef
	for _, s := range valid {
		for i := range s.Windows {
			out = append(out, WindowRef{s.Shard, i})
		}
	}
	return out
}

// shuffle returns a permutation of [0, n): Fisher–Yates driven by PCG(seed,
// splitmix64(epoch<<32 | shard)) with unbiased bounded draws. It is written out rather than
// taken from math/rand/v2's Shuffle, whose algorithm carries no stability promise, so that
// a checkpoint resumes into the same order under any Go version.
func shuffle(n int, seed uint64, epoch, shard int) []int {
	rng := rand.NewPCG(seed, splitmix64(uint64(epoch)<<32|uint64(uint32(shard))))
	p := make([]int, n)
	for i := range p {
		p[i] = i
	}
	for i := n - 1; i > 0; i-- {
		j := bounded(rng, uint64(i+1))
		p[i], p[j] = p[j], p[i]
	}
	return p
}

// bounded returns a uniform draw from [0, n) by rejection (n ≥ 1).
func bounded(rng *rand.PCG, n uint64) int {
	limit := -n % n // 2^64 mod n: draws below it would bias the modulus
	for {
		if x := rng.Uint64(); x >= limit {
			return int(x % n)
		}
	}
}

func splitmix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

// fetched is a batch of windows with the shards they came from.
type fetched struct {
	ex     []Example
	ids    []int // global window indices
	tokens int
	shards map[int]string // shard → SHA-256 of its file
}

// fetch returns the windows refs name (all of one split) in order, loading their shards
// (waiting for them if so configured), evicting the other cached shards, and starting a
// background load of the shard after the last one needed. The examples alias the cached
// shards: they stay valid until the next fetch.
func (d *ShardData) fetch(ctx context.Context, refs []WindowRef) (*fetched, error) {
	out := &fetched{shards: map[int]string{}}
	need := map[int]bool{}
	for _, r := range refs {
		need[r.Shard] = true
	}
	for k := range d.cache {
		if !need[k] {
			delete(d.cache, k) // before loading more: at most this batch's shards and one ahead
		}
	}
	var last int
	for _, r := range refs {
		ls, err := d.get(ctx, r.Shard)
		if err != nil {
			return nil, err
		}
		if r.Index < 0 || r.Index >= len(ls.windows) {
			return nil, fmt.Errorf("%w: window %d of shard %d, which holds %d", ErrData, r.Index, r.Shard, len(ls.windows))
		}
		w := ls.windows[r.Index]
		out.ex = append(out.ex, w.ex)
		out.ids = append(out.ids, w.id)
		out.tokens += w.n
		out.shards[r.Shard] = ls.sha
		last = r.Shard
	}
	if len(refs) > 0 {
		if next, ok := d.next(last); ok {
			if _, cached := d.cache[next]; !cached {
				d.startPrefetch(ctx, next)
			}
		}
	}
	return out, nil
}

// next returns the shard after shard in its split's plan order, wrapping around (the next
// epoch, or the next validation pass, starts again at the first).
func (d *ShardData) next(shard int) (int, bool) {
	pos, ok := d.byShard[shard]
	if !ok {
		return 0, false
	}
	specs := d.specs(pos.split)
	n := specs[(pos.i+1)%len(specs)].Shard
	return n, n != shard
}

func (d *ShardData) specs(split string) []ShardSpec {
	if split == shards.SplitValid {
		return d.valid
	}
	return d.train
}

func (d *ShardData) spec(pos shardPos) ShardSpec { return d.specs(pos.split)[pos.i] }

// get returns shard, from the cache, from the background load, or loaded now. A failed
// background load is not trusted: the shard is loaded again (the file may have been
// rebuilt meanwhile), and that load's error is returned.
func (d *ShardData) get(ctx context.Context, shard int) (*loadedShard, error) {
	if ls, ok := d.cache[shard]; ok {
		return ls, nil
	}
	if pf := d.ahead; pf != nil {
		if pf.shard == shard {
			select {
			case <-pf.done:
			case <-ctx.Done():
				d.stopPrefetch()
				return nil, ctx.Err()
			}
			d.ahead = nil
			pf.cancel()
			if pf.err == nil {
				d.cache[shard] = pf.res
				return pf.res, nil
			}
		} else {
			d.stopPrefetch()
		}
	}
	ls, err := d.load(ctx, shard)
	if err != nil {
		return nil, err
	}
	d.cache[shard] = ls
	return ls, nil
}

func (d *ShardData) startPrefetch(ctx context.Context, shard int) {
	if d.ahead != nil {
		if d.ahead.shard == shard {
			return
		}
		d.stopPrefetch()
	}
	pctx, cancel := context.WithCancel(ctx)
	pf := &prefetch{shard: shard, cancel: cancel, done: make(chan struct{})}
	d.ahead = pf
	go func() {
		defer close(pf.done)
		pf.res, pf.err = d.load(pctx, shard)
	}()
}

// stopPrefetch cancels the background load, if any, and waits for it to end.
func (d *ShardData) stopPrefetch() {
	if pf := d.ahead; pf != nil {
		pf.cancel()
		<-pf.done
		d.ahead = nil
	}
}

// Release stops the background load, waits for it, and drops the cached shards. The
// ShardData stays usable: shards are loaded again when needed. Trainer.Run calls it on
// return.
func (d *ShardData) Release() {
	d.stopPrefetch()
	clear(d.cache)
}

// load reads shard from disk. It touches only immutable fields of d (it runs in the
// background loader too).
func (d *ShardData) load(ctx context.Context, shard int) (*loadedShard, error) {
	pos, ok := d.byShard[shard]
	if !ok {
		return nil, fmt.Errorf("%w: shard %d is not in the plan", ErrData, shard)
	}
	spec := d.spec(pos)
	if d.o.wait != nil {
		if err := d.o.wait(ctx, shard); err != nil {
			return nil, fmt.Errorf("student: waiting for shard %d: %w", shard, err)
		}
	}
	e, err := d.entry(ctx, shard)
	if err != nil {
		return nil, err
	}
	if e.Split != pos.split || e.Windows != spec.Windows {
		return nil, fmt.Errorf("%w: shard %d is a %s shard of %d windows in the manifest, planned as %s with %d",
			ErrData, shard, e.Split, e.Windows, pos.split, spec.Windows)
	}
	rows, err := shards.ReadShardFile(e.Path(d.dir), d.meta, e.SHA256)
	if err != nil {
		return nil, fmt.Errorf("student: shard %d: %w", shard, err)
	}
	ls := &loadedShard{shard: shard, sha: e.SHA256}
	for lo := 0; lo < len(rows); {
		hi := lo + 1
		for hi < len(rows) && rows[hi].Window == rows[lo].Window {
			hi++
		}
		c := rows[lo]
		if hi-lo > 1 || c.Chunks != 1 {
			if c, err = shards.JoinWindow(d.meta, rows[lo:hi]); err != nil {
				return nil, fmt.Errorf("%w: shard %d window %d: %w", ErrData, shard, rows[lo].Window, err)
			}
		}
		if c.Shard != shard || c.TokenLo != 0 {
			return nil, fmt.Errorf("%w: shard %d: window %d of shard %d starts at token %d", ErrData, shard, c.Window, c.Shard, c.TokenLo)
		}
		ls.windows = append(ls.windows, window{id: c.Window, n: c.Tokens(),
			ex: Example{XCut: c.XCut, TopKIdx: c.TopKIdx, TopKProb: c.TopKProb, XFinal: c.XFinal}})
		lo = hi
	}
	if len(ls.windows) != spec.Windows {
		return nil, fmt.Errorf("%w: shard %d holds %d windows, planned %d", ErrData, shard, len(ls.windows), spec.Windows)
	}
	return ls, nil
}

// entry returns shard's manifest entry, polling for it when so configured.
func (d *ShardData) entry(ctx context.Context, shard int) (shards.ManifestEntry, error) {
	path := filepath.Join(d.dir, ManifestName)
	var (
		began, changed, logged time.Time
		listed                 = -2 // entries in the manifest at the last poll; -1: no manifest
	)
	for {
		m, err := shards.LoadManifest(path)
		n := -1
		switch {
		case err == nil:
			if e, ok := m.Entry(shard); ok {
				if !logged.IsZero() {
					d.o.log.Info("shard arrived in the manifest", "shard", shard, "waited", time.Since(began).Round(time.Millisecond))
				}
				return e, nil
			}
			if d.o.poll == 0 {
				return shards.ManifestEntry{}, fmt.Errorf("%w: shard %d in %s", ErrShardMissing, shard, path)
			}
			n = len(m.Shards)
		case errors.Is(err, fs.ErrNotExist) && d.o.poll > 0:
		default:
			return shards.ManifestEntry{}, err
		}
		now := time.Now()
		if began.IsZero() {
			began = now
		}
		if n != listed {
			listed, changed = n, now
		}
		if d.o.stall > 0 && now.Sub(changed) >= d.o.stall {
			return shards.ManifestEntry{}, fmt.Errorf("%w: shard %d is not in %s (%s) and nothing has been added for %v: no cache writer is completing it (is the cache writer running, and the cache made for this plan?)",
				ErrShardMissing, shard, path, describeListed(listed), d.o.stall)
		}
		// A short wait is the normal pace of a pipeline whose student trains as the cache
		// lands: not worth a line. The first comes after min(5 s, logEvery, half the limit).
		quiet := min(5*time.Second, d.o.logEvery)
		if d.o.stall > 0 {
			quiet = min(quiet, d.o.stall/2)
		}
		if d.o.log != nil && now.Sub(began) >= quiet && (logged.IsZero() || now.Sub(logged) >= d.o.logEvery) {
			logged = now
			d.o.log.Info("waiting for a shard to appear in the cache manifest", "shard", shard, "manifest", path,
				"listed", describeListed(listed), "waited", now.Sub(began).Round(time.Second), "give_up_after_no_change", d.o.stall)
		}
		t := time.NewTimer(d.o.poll)
		select {
		case <-ctx.Done():
			t.Stop()
			return shards.ManifestEntry{}, fmt.Errorf("student: waiting for shard %d: %w", shard, ctx.Err())
		case <-t.C:
		}
	}
}

// describeListed says what a polled manifest held.
func describeListed(n int) string {
	if n < 0 {
		return "no manifest yet"
	}
	return fmt.Sprintf("%d shards listed", n)
}
