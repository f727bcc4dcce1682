package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// taskIDHeader carries the task id next to Nats-Msg-Id, for handlers and dead letters.
const taskIDHeader = "Lp-Task-Id"

// PublishTask publishes one task of phase to the tasks stream with Nats-Msg-Id
// id, waiting for the stream's ack and retrying transient failures (server
// restarting) until ctx ends. Republishing the same id inside the tasks
// stream's duplicate window (a coordinator restarting and replaying its plan)
// stores nothing. Errors wrap ErrInvalidPhase, ErrInvalidOption (empty id) or
// the last publish failure.
func PublishTask(ctx context.Context, js jetstream.JetStream, names Names, phase, id string, payload []byte) error {
	if err := ValidatePhase(phase); err != nil {
		return err
	}
	if id == "" {
		return fmt.Errorf("%w: empty task id", ErrInvalidOption)
	}
	m := &nats.Msg{Subject: names.TaskSubject(phase), Data: payload, Header: nats.Header{}}
	m.Header.Set(jetstream.MsgIDHeader, id)
	m.Header.Set(taskIDHeader, id)
	if _, err := publishRetry(ctx, js, m, 10*time.Second, slog.New(slog.DiscardHandler)); err != nil {
		return fmt.Errorf("worker: publish task %s: %w", id, err)
	}
	return nil
}

// Task is one delivery of a task to a Handler.
type Task struct {
	ID        string // the id given to PublishTask (else the Nats-Msg-Id, if any)
	Phase     string
	Payload   []byte // owned by the handler
	Delivered int    // 1 on the first delivery; MaxDeliver on the last
	// InProgress resets the server's redelivery timer. The loop already calls
	// it every AckWait/3 while the handler runs; a handler may call it too.
	InProgress func() error
}

// Handler processes one task. It returns nil only after every effect of the
// task is durable (e.g. Publisher.Flush returned nil); the task is then acked.
// An error (or a panic) naks the task for a later redelivery, which may reach
// another worker, so handlers must be idempotent. ctx ends when the loop stops.
type Handler func(ctx context.Context, t Task) error

// LoopOption configures NewTaskLoop.
type LoopOption func(*loopOptions) error

type loopOptions struct {
	cfg       StreamConfig
	nakBase   time.Duration
	nakMax    time.Duration
	fetchWait time.Duration
	log       *slog.Logger
	now       func() time.Time
}

// WithLoopConfig sets AckWait and MaxDeliver of the consumer from cfg (the
// value given to Setup); the default is StreamConfig{} with defaults filled.
func WithLoopConfig(cfg StreamConfig) LoopOption {
	return func(o *loopOptions) error {
		if err := cfg.Validate(); err != nil {
			return err
		}
		o.cfg = cfg
		return nil
	}
}

// WithNakBackoff sets the redelivery delay after a failed delivery n:
// base·2^(n-1), capped at max (defaults 1s and 1m).
func WithNakBackoff(base, max time.Duration) LoopOption {
	return func(o *loopOptions) error {
		if base <= 0 || max < base {
			return fmt.Errorf("%w: nak backoff %v..%v", ErrInvalidOption, base, max)
		}
		o.nakBase, o.nakMax = base, max
		return nil
	}
}

// WithFetchWait sets how long one pull request waits for a task before it is
// renewed (default 5s, at least 100ms). It bounds how long Run takes to notice
// a lost pull request.
func WithFetchWait(d time.Duration) LoopOption {
	return func(o *loopOptions) error {
		if d < 100*time.Millisecond {
			return fmt.Errorf("%w: fetch wait %v below 100ms", ErrInvalidOption, d)
		}
		o.fetchWait = d
		return nil
	}
}

// WithLoopLogger logs deliveries, failures and dead letters to l (default: discarded).
func WithLoopLogger(l *slog.Logger) LoopOption {
	return func(o *loopOptions) error {
		if l == nil {
			return fmt.Errorf("%w: nil logger", ErrInvalidOption)
		}
		o.log = l
		return nil
	}
}

// WithClock sets the clock stamping dead-letter records (default time.Now).
func WithClock(now func() time.Time) LoopOption {
	return func(o *loopOptions) error {
		if now == nil {
			return fmt.Errorf("%w: nil clock", ErrInvalidOption)
		}
		o.now = now
		return nil
	}
}

// TaskLoop pulls tasks one at a time from a durable consumer shared by every
// worker of the run and acks, naks or dead-letters them.
type TaskLoop struct {
	js       jetstream.JetStream
	names    Names
	consumer string
	phases   []string
	h        Handler
	o        loopOptions
}

// NewTaskLoop returns a loop for the given phases. consumerName is the durable
// consumer shared by all workers of the same kind; its filter is the phases'
// task subjects, and on a WorkQueue stream two consumers' filters must not
// overlap. Errors wrap ErrInvalidOption, ErrInvalidName or ErrInvalidPhase.
func NewTaskLoop(js jetstream.JetStream, names Names, consumerName string, phases []string, h Handler, opts ...LoopOption) (*TaskLoop, error) {
	if js == nil || h == nil {
		return nil, fmt.Errorf("%w: nil JetStream or handler", ErrInvalidOption)
	}
	if err := ValidateRunID(names.Run()); err != nil {
		return nil, err
	}
	if err := validateName(consumerName); err != nil {
		return nil, err
	}
	if len(phases) == 0 {
		return nil, fmt.Errorf("%w: no phases", ErrInvalidOption)
	}
	for i, ph := range phases {
		if err := ValidatePhase(ph); err != nil {
			return nil, err
		}
		if slices.Contains(phases[:i], ph) {
			return nil, fmt.Errorf("%w: phase %q twice", ErrInvalidOption, ph)
		}
	}
	o := loopOptions{
		nakBase:   time.Second,
		nakMax:    time.Minute,
		fetchWait: 5 * time.Second,
		log:       slog.New(slog.DiscardHandler),
		now:       time.Now,
	}
	if err := o.cfg.Validate(); err != nil {
		return nil, err
	}
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	return &TaskLoop{js: js, names: names, consumer: consumerName, phases: slices.Clone(phases), h: h, o: o}, nil
}

func (l *TaskLoop) consumerConfig() jetstream.ConsumerConfig {
	filters := make([]string, len(l.phases))
	for i, ph := range l.phases {
		filters[i] = l.names.TaskSubject(ph)
	}
	return jetstream.ConsumerConfig{
		Durable:        l.consumer,
		Description:    "linearpatch task loop",
		DeliverPolicy:  jetstream.DeliverAllPolicy,
		AckPolicy:      jetstream.AckExplicitPolicy,
		AckWait:        l.o.cfg.AckWait,
		MaxDeliver:     l.o.cfg.MaxDeliver,
		FilterSubjects: filters,
	}
}

// Run creates or updates the durable consumer and processes tasks one at a
// time until ctx ends, then returns nil. It survives server restarts: pulls are
// renewed after a reconnect and the consumer is re-created if it vanished. It
// returns an error if the consumer cannot be created at start (e.g. its filter
// overlaps another consumer's on the work queue) or the connection is closed.
func (l *TaskLoop) Run(ctx context.Context) error {
	cons, err := l.js.CreateOrUpdateConsumer(ctx, l.names.TasksStream(), l.consumerConfig())
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("worker: task consumer %s: %w", l.consumer, err)
	}
	nc := l.js.Conn()
	wait := retryMinWait
	for ctx.Err() == nil {
		if nc.IsClosed() {
			return fmt.Errorf("worker: task loop %s: %w", l.consumer, nats.ErrConnectionClosed)
		}
		if !nc.IsConnected() {
			// A pull sent now would be buffered and could be served after this
			// fetch gave up, parking a task for a whole AckWait.
			_ = SleepCtx(ctx, 50*time.Millisecond)
			continue
		}
		if cons == nil {
			if cons, err = l.js.CreateOrUpdateConsumer(ctx, l.names.TasksStream(), l.consumerConfig()); err != nil {
				l.o.log.Warn("task consumer unavailable, retrying", "consumer", l.consumer, "err", err)
				_ = SleepCtx(ctx, wait)
				wait = min(2*wait, retryMaxWait)
				continue
			}
		}
		msg, err := l.next(ctx, cons)
		switch {
		case err == nil:
			wait = retryMinWait
			l.handle(ctx, msg)
		case ctx.Err() != nil:
		case errors.Is(err, context.DeadlineExceeded), errors.Is(err, nats.ErrTimeout),
			errors.Is(err, jetstream.ErrNoMessages):
			// No task within fetchWait.
		default:
			l.o.log.Warn("fetching task failed", "consumer", l.consumer, "err", err)
			if errors.Is(err, jetstream.ErrConsumerNotFound) || errors.Is(err, jetstream.ErrConsumerDeleted) {
				cons = nil
			}
			_ = SleepCtx(ctx, wait)
			wait = min(2*wait, retryMaxWait)
		}
	}
	return nil
}

// next pulls one message, waiting at most fetchWait.
func (l *TaskLoop) next(ctx context.Context, cons jetstream.Consumer) (jetstream.Msg, error) {
	fctx, cancel := context.WithTimeout(ctx, l.o.fetchWait)
	defer cancel()
	return cons.Next(jetstream.FetchContext(fctx))
}

// handle runs the handler on one delivery and settles it.
func (l *TaskLoop) handle(ctx context.Context, msg jetstream.Msg) {
	md, err := msg.Metadata()
	if err != nil {
		l.o.log.Error("task without metadata, terminating", "subject", msg.Subject(), "err", err)
		_ = msg.Term()
		return
	}
	phase, err := l.names.ParseTaskSubject(msg.Subject())
	if err != nil || !slices.Contains(l.phases, phase) {
		l.o.log.Error("task on unexpected subject, terminating", "subject", msg.Subject())
		_ = msg.TermWithReason("unexpected subject")
		return
	}
	id := msg.Headers().Get(taskIDHeader)
	if id == "" {
		id = msg.Headers().Get(jetstream.MsgIDHeader)
	}
	t := Task{
		ID:         id,
		Phase:      phase,
		Payload:    msg.Data(),
		Delivered:  int(md.NumDelivered),
		InProgress: msg.InProgress,
	}
	log := l.o.log.With("task", t.ID, "phase", phase, "delivered", t.Delivered, "stream_seq", md.Sequence.Stream)
	log.Debug("task started")

	herr := l.runHandler(ctx, msg, t)
	if herr == nil {
		if err := l.ack(ctx, msg); err != nil {
			// The task will be redelivered; its effects are idempotent.
			log.Warn("task done but ack failed", "err", err)
			return
		}
		log.Debug("task acked")
		return
	}
	if ctx.Err() != nil {
		// Stopping: hand the task straight to another worker, no dead letter.
		log.Info("task interrupted by shutdown, nak", "err", herr)
		_ = msg.Nak()
		return
	}
	if t.Delivered >= l.o.cfg.MaxDeliver {
		l.deadLetter(ctx, msg, t, md, herr, log)
		return
	}
	delay := l.nakDelay(t.Delivered)
	log.Warn("task failed, nak", "err", herr, "redeliver_in", delay)
	if err := msg.NakWithDelay(delay); err != nil {
		log.Warn("nak failed; task comes back after AckWait", "err", err)
	}
}

// ack acknowledges msg and waits for the server's confirmation, retrying
// through a reconnect (the ack subject stays valid on a restarted server) for
// at most AckWait, after which the task is redelivered anyway. It runs even if
// ctx has ended: the work is done and should count.
func (l *TaskLoop) ack(ctx context.Context, msg jetstream.Msg) error {
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), l.o.cfg.AckWait)
	defer cancel()
	wait := retryMinWait / 2
	for {
		err := msg.DoubleAck(actx)
		if err == nil || !transient(err) || actx.Err() != nil {
			return err
		}
		if SleepCtx(actx, wait) != nil {
			return err
		}
		wait = min(2*wait, retryMaxWait)
	}
}

// runHandler calls the handler with in-progress acks every AckWait/3 from a
// goroutine that ends before runHandler returns. A panic becomes an error
// wrapping ErrHandlerPanic.
func (l *TaskLoop) runHandler(ctx context.Context, msg jetstream.Msg, t Task) (err error) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		tick := time.NewTicker(l.o.cfg.AckWait / 3)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
				if err := msg.InProgress(); err != nil {
					l.o.log.Warn("in-progress ack failed", "task", t.ID, "err", err)
				}
			}
		}
	})
	defer func() {
		close(done)
		wg.Wait()
	}()
	defer func() {
		if r := recover(); r != nil {
			l.o.log.Error("task handler panicked", "task", t.ID, "phase", t.Phase,
				"panic", r, "stack", string(debug.Stack()))
			err = fmt.Errorf("%w: %v", ErrHandlerPanic, r)
		}
	}()
	return l.h(ctx, t)
}

func (l *TaskLoop) nakDelay(delivered int) time.Duration {
	d := l.o.nakBase
	for i := 1; i < delivered && d < l.o.nakMax; i++ {
		d *= 2
	}
	return min(d, l.o.nakMax)
}
