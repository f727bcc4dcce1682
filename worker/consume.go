package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Msg is one delivery of a data message, as passed by Consume (a StoredMsg, read
// from the stream directly, has no delivery to settle: its methods do nothing). Data and Header are owned by the
// callee. Exactly one of Ack, AckSync, Nak, NakWithDelay or Term should be
// called, once the message's effect is durable (or deliberately dropped);
// a message left alone is redelivered after AckWait. Msg values may be kept
// and acked later (e.g. after a shard file is fsynced), from any goroutine,
// within AckWait or with InProgress calls.
type Msg struct {
	Subject   string
	Header    nats.Header
	Data      []byte
	Delivered int // 1 on the first delivery
	raw       jetstream.Msg
}

// Ack acknowledges the message without waiting for the server.
func (m Msg) Ack() error {
	if m.raw == nil {
		return nil
	}
	return m.raw.Ack()
}

// AckSync acknowledges the message and waits for the server to confirm it.
func (m Msg) AckSync(ctx context.Context) error {
	if m.raw == nil {
		return nil
	}
	return m.raw.DoubleAck(ctx)
}

// Nak asks for an immediate redelivery.
func (m Msg) Nak() error {
	if m.raw == nil {
		return nil
	}
	return m.raw.Nak()
}

// NakWithDelay asks for a redelivery after d.
func (m Msg) NakWithDelay(d time.Duration) error {
	if m.raw == nil {
		return nil
	}
	return m.raw.NakWithDelay(d)
}

// Term drops the message for this consumer for good (e.g. a poison message).
func (m Msg) Term() error {
	if m.raw == nil {
		return nil
	}
	return m.raw.Term()
}

// InProgress resets the message's AckWait timer.
func (m Msg) InProgress() error {
	if m.raw == nil {
		return nil
	}
	return m.raw.InProgress()
}

// ConsumeOption configures Consume.
type ConsumeOption func(*consumeOptions) error

type consumeOptions struct {
	ackWait       time.Duration
	maxDeliver    int
	maxAckPending int
	bufBytes      int
	sole          bool
	log           *slog.Logger
}

// WithConsumeAckWait sets the consumer's AckWait (default DefaultAckWait).
func WithConsumeAckWait(d time.Duration) ConsumeOption {
	return func(o *consumeOptions) error {
		if d < 100*time.Millisecond {
			return fmt.Errorf("%w: ack wait %v below 100ms", ErrInvalidOption, d)
		}
		o.ackWait = d
		return nil
	}
}

// WithConsumeMaxDeliver caps deliveries per message (default -1: unlimited, a
// data message is never given up on).
func WithConsumeMaxDeliver(n int) ConsumeOption {
	return func(o *consumeOptions) error {
		if n == 0 || n < -1 {
			return fmt.Errorf("%w: max deliver %d", ErrInvalidOption, n)
		}
		o.maxDeliver = n
		return nil
	}
}

// WithMaxAckPending bounds delivered but unacked messages (default 1000); a
// caller that acks in batches must allow a whole batch.
func WithMaxAckPending(n int) ConsumeOption {
	return func(o *consumeOptions) error {
		if n < 1 {
			return fmt.Errorf("%w: max ack pending %d", ErrInvalidOption, n)
		}
		o.maxAckPending = n
		return nil
	}
}

// WithBufferBytes bounds the bytes pulled ahead of fn (default 32 MiB, raised
// to 4 max payloads so a full-size message always fits).
func WithBufferBytes(n int) ConsumeOption {
	return func(o *consumeOptions) error {
		if n < 1 {
			return fmt.Errorf("%w: buffer bytes %d", ErrInvalidOption, n)
		}
		o.bufBytes = n
		return nil
	}
}

// WithSoleClient says the caller is the durable consumer's only client (it holds
// the run's lease for it): messages an earlier client left delivered but unacked
// (it died) are then delivered again at once, not after AckWait. Consume does
// so by re-creating the consumer from its ack floor; messages acked after the
// floor come again too, and the caller acks them as stale.
func WithSoleClient() ConsumeOption {
	return func(o *consumeOptions) error {
		o.sole = true
		return nil
	}
}

// WithConsumeLogger logs consumer errors to l (default: discarded).
func WithConsumeLogger(l *slog.Logger) ConsumeOption {
	return func(o *consumeOptions) error {
		if l == nil {
			return fmt.Errorf("%w: nil logger", ErrInvalidOption)
		}
		o.log = l
		return nil
	}
}

// Consume creates or updates the durable pull consumer consumerName on the
// data stream, filtered on filterSubject ("" for the whole stream; otherwise a
// subject or wildcard under Names.DataSubjects, e.g. Names.DataFilter(phase)),
// with explicit acks, and calls fn for each delivery, in the order received,
// until ctx ends; then it returns nil. fn acks (see Msg); redeliveries are not
// ordered. If fn returns an error or panics, the message is nak'd and Consume
// returns that error (a panic wraps ErrHandlerPanic); an error that only says
// ctx ended (an ack cut short by the shutdown) is a stop, and Consume returns
// nil. Server restarts are survived; the consumer is re-created if it vanished.
// A closed connection ends Consume with an error wrapping nats.ErrConnectionClosed.
func Consume(ctx context.Context, js jetstream.JetStream, names Names, consumerName, filterSubject string, fn func(ctx context.Context, m Msg) error, opts ...ConsumeOption) error {
	if js == nil || fn == nil {
		return fmt.Errorf("%w: nil JetStream or fn", ErrInvalidOption)
	}
	if err := validateName(consumerName); err != nil {
		return err
	}
	if filterSubject == "" {
		filterSubject = names.DataSubjects()
	}
	prefix := strings.TrimSuffix(names.DataSubjects(), ">")
	if !strings.HasPrefix(filterSubject, prefix) || len(filterSubject) == len(prefix) {
		return fmt.Errorf("%w: filter %q is not under %s", ErrInvalidOption, filterSubject, names.DataSubjects())
	}
	o := consumeOptions{
		ackWait:       DefaultAckWait,
		maxDeliver:    -1,
		maxAckPending: 1000,
		bufBytes:      32 << 20,
		log:           slog.New(slog.DiscardHandler),
	}
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return err
		}
	}
	cfg := jetstream.ConsumerConfig{
		Durable:       consumerName,
		Description:   "linearpatch data consumer",
		DeliverPolicy: jetstream.DeliverAllPolicy,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       o.ackWait,
		MaxDeliver:    o.maxDeliver,
		MaxAckPending: o.maxAckPending,
		FilterSubject: filterSubject,
	}
	if err := resumeFrom(ctx, js, names, &cfg, o); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("worker: data consumer %s: %w", consumerName, err)
	}
	cons, err := js.CreateOrUpdateConsumer(ctx, names.DataStream(), cfg)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("worker: data consumer %s: %w", consumerName, err)
	}
	buf := max(o.bufBytes, 4*MaxPayload(js.Conn()))
	wait := retryMinWait
	for ctx.Err() == nil {
		if js.Conn().IsClosed() {
			return fmt.Errorf("worker: consume %s: %w", consumerName, nats.ErrConnectionClosed)
		}
		if cons == nil {
			if cons, err = js.CreateOrUpdateConsumer(ctx, names.DataStream(), cfg); err != nil {
				o.log.Warn("data consumer unavailable, retrying", "consumer", consumerName, "err", err)
				_ = SleepCtx(ctx, wait)
				wait = min(2*wait, retryMaxWait)
				continue
			}
		}
		iter, err := cons.Messages(jetstream.PullMaxBytes(buf), jetstream.WithMessagesErrOnMissingHeartbeat(false))
		if err != nil {
			o.log.Warn("data consumer iterator", "consumer", consumerName, "err", err)
			cons = nil
			_ = SleepCtx(ctx, wait)
			wait = min(2*wait, retryMaxWait)
			continue
		}
		err = drain(ctx, iter, fn, o.log)
		iter.Stop()
		if err != nil {
			return fmt.Errorf("worker: consume %s: %w", consumerName, err)
		}
		if ctx.Err() == nil {
			// The iterator stopped under us: consumer deleted, connection closed.
			cons = nil
			_ = SleepCtx(ctx, wait)
			wait = min(2*wait, retryMaxWait)
		}
	}
	return nil
}

// resumeFrom adapts cfg to the durable consumer already on the server, if any: it keeps
// the consumer's start position (a deliver policy cannot be updated), and for a sole
// client with messages left pending by an earlier client it deletes the consumer and
// starts cfg after the ack floor, so those messages come at once.
//
// A consumer whose delivered sequence is past the stream's last one (a server that lost
// the last messages it had stored, but not the consumer state that counted them; the
// server itself corrects only single-replica consumers) would skip the messages stored
// next, which get those sequences again: records republished to make up for the lost
// ones. Such a consumer is re-created from the stream's end, or from its ack floor when
// that is lower, for any client. This is seen when the client starts: messages stored
// before that are still skipped. (The server itself corrects a single-replica consumer
// when it restarts, before any client can publish.)
func resumeFrom(ctx context.Context, js jetstream.JetStream, names Names, cfg *jetstream.ConsumerConfig, o consumeOptions) error {
	cons, err := js.Consumer(ctx, names.DataStream(), cfg.Durable)
	if errors.Is(err, jetstream.ErrConsumerNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	info := cons.CachedInfo()
	cfg.DeliverPolicy, cfg.OptStartSeq = info.Config.DeliverPolicy, info.Config.OptStartSeq
	stream, err := js.Stream(ctx, names.DataStream())
	if err != nil {
		return err
	}
	last := stream.CachedInfo().State.LastSeq
	ahead := info.Delivered.Stream > last
	if !ahead && (!o.sole || info.NumAckPending == 0) {
		return nil
	}
	if err := js.DeleteConsumer(ctx, names.DataStream(), cfg.Durable); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
		return err
	}
	cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, min(info.AckFloor.Stream, last)+1
	if ahead {
		o.log.Warn("the consumer is past the stream's last sequence (the server lost messages it had stored): delivering from there again",
			"consumer", cfg.Durable, "delivered_seq", info.Delivered.Stream, "stream_last_seq", last, "from_seq", cfg.OptStartSeq)
		return nil
	}
	o.log.Info("messages left unacked by an earlier client: delivering them again now", "consumer", cfg.Durable,
		"pending", info.NumAckPending, "from_seq", cfg.OptStartSeq)
	return nil
}

// drain feeds fn from iter until ctx ends or the iterator fails (nil; the
// iterator error is logged) or fn fails (its error; nil when fn only reports
// that ctx ended).
func drain(ctx context.Context, iter jetstream.MessagesContext, fn func(context.Context, Msg) error, log *slog.Logger) error {
	for {
		// The iterator renews pulls after reconnects and missed heartbeats by
		// itself; an error here means it stopped.
		raw, err := iter.Next(jetstream.NextContext(ctx))
		if err != nil {
			if ctx.Err() == nil {
				log.Warn("data consumer stopped, restarting", "err", err)
			}
			return nil
		}
		m := NewMsg(raw)
		if err := callFn(ctx, fn, m); err != nil {
			_ = raw.Nak()
			if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
				// fn was cut short by the shutdown (an ack in flight): a stop, not a failure
				return nil
			}
			return err
		}
	}
}

func callFn(ctx context.Context, fn func(context.Context, Msg) error, m Msg) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: %v\n%s", ErrHandlerPanic, r, debug.Stack())
		}
	}()
	return fn(ctx, m)
}

// NewMsg wraps a message read outside Consume (e.g. from an ordered consumer that
// replays a shard's records). Acks on a message of an ack-none consumer are no-ops.
func NewMsg(raw jetstream.Msg) Msg {
	m := Msg{Subject: raw.Subject(), Header: raw.Headers(), Data: raw.Data(), Delivered: 1, raw: raw}
	if md, err := raw.Metadata(); err == nil {
		m.Delivered = int(md.NumDelivered)
	}
	return m
}
