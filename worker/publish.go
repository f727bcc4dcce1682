package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// PublisherOption configures NewPublisher.
type PublisherOption func(*publisherOptions) error

type publisherOptions struct {
	maxPending int
	ackTimeout time.Duration
	log        *slog.Logger
}

// WithMaxPending bounds the messages in flight (published, not yet acked by
// the stream); Publish waits for the oldest when the window is full.
// Default 64.
func WithMaxPending(n int) PublisherOption {
	return func(o *publisherOptions) error {
		if n < 1 {
			return fmt.Errorf("%w: max pending %d", ErrInvalidOption, n)
		}
		o.maxPending = n
		return nil
	}
}

// WithAckTimeout is how long one message may wait for its stream ack before it
// is republished (same Nats-Msg-Id, so stored once). Default 10s.
func WithAckTimeout(d time.Duration) PublisherOption {
	return func(o *publisherOptions) error {
		if d <= 0 {
			return fmt.Errorf("%w: ack timeout %v", ErrInvalidOption, d)
		}
		o.ackTimeout = d
		return nil
	}
}

// WithPublisherLogger logs retries to l (default: discarded).
func WithPublisherLogger(l *slog.Logger) PublisherOption {
	return func(o *publisherOptions) error {
		if l == nil {
			return fmt.Errorf("%w: nil logger", ErrInvalidOption)
		}
		o.log = l
		return nil
	}
}

// PublisherStats counts what a Publisher's messages became.
type PublisherStats struct {
	Stored     int // acked as new messages
	Duplicates int // acked as duplicates of an earlier Nats-Msg-Id (dropped by the stream)
	Retries    int // messages republished after a lost ack or a disconnect
}

type pendingPub struct {
	msg *nats.Msg
	fut jetstream.PubAckFuture
}

// Publisher publishes data messages asynchronously with a bounded window of
// unacknowledged messages, each with a Nats-Msg-Id, and tells the caller when
// all of them are durable (Flush). Messages whose ack is lost (disconnect,
// server restart, timeout) are republished until acked or ctx ends; the
// duplicate window makes that safe.
//
// A Publisher is not safe for concurrent use, and its first failure is sticky:
// use one per task (they can share a JetStream context) and, on an error, fail
// the task.
type Publisher struct {
	js    jetstream.JetStream
	o     publisherOptions
	queue []pendingPub // FIFO of messages awaiting their ack
	err   error        // first failure, sticky
	stats PublisherStats
}

// NewPublisher returns a Publisher on js.
func NewPublisher(js jetstream.JetStream, opts ...PublisherOption) (*Publisher, error) {
	if js == nil {
		return nil, fmt.Errorf("%w: nil JetStream", ErrInvalidOption)
	}
	o := publisherOptions{maxPending: 64, ackTimeout: 10 * time.Second, log: slog.New(slog.DiscardHandler)}
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	return &Publisher{js: js, o: o}, nil
}

// Publish sends payload to subject with Nats-Msg-Id msgID and the given extra
// headers, waiting first for the oldest message's ack if MaxPending messages
// are in flight. It returns before the ack of this message: call Flush to know
// it is durable. The Publisher keeps payload until then; the caller must not
// modify it.
//
// Errors: *TooLargeError (errors.Is ErrTooLarge) when payload plus encoded
// headers exceeds the connection's max payload — chunk and retry, the
// Publisher stays usable; ErrInvalidOption for an empty msgID or a header that
// sets Nats-Msg-Id; otherwise the first failure of this or an earlier message
// (sticky). Connection-level failures, including "no stream responded" (which
// a stream still recovering and a subject no stream captures look alike), are
// retried until ctx ends.
func (p *Publisher) Publish(ctx context.Context, subject, msgID string, payload []byte, headers map[string]string) error {
	if p.err != nil {
		return p.err
	}
	if msgID == "" {
		return fmt.Errorf("%w: empty msg id for %s", ErrInvalidOption, subject)
	}
	m := &nats.Msg{Subject: subject, Data: payload, Header: make(nats.Header, len(headers)+1)}
	for k, v := range headers {
		m.Header.Set(k, v)
	}
	if m.Header.Get(jetstream.MsgIDHeader) != "" {
		return fmt.Errorf("%w: header %s is set by the publisher", ErrInvalidOption, jetstream.MsgIDHeader)
	}
	m.Header.Set(jetstream.MsgIDHeader, msgID)
	limit := MaxPayload(p.js.Conn())
	if size := m.Size() - len(m.Subject); limit > 0 && size > limit {
		return &TooLargeError{Subject: subject, Size: size, Limit: limit}
	}
	for len(p.queue) >= p.o.maxPending {
		if err := p.settleOldest(ctx); err != nil {
			return err
		}
	}
	fut, err := p.js.PublishMsgAsync(m)
	switch {
	case err == nil:
		p.queue = append(p.queue, pendingPub{msg: m, fut: fut})
		return nil
	case errors.Is(err, nats.ErrMaxPayload):
		// The limit changed under us (reconnected to another server).
		return &TooLargeError{Subject: subject, Size: m.Size() - len(m.Subject), Limit: MaxPayload(p.js.Conn())}
	case transient(err):
		p.stats.Retries++
		ack, err := publishRetry(ctx, p.js, m, p.o.ackTimeout, p.o.log)
		return p.record(ack, err)
	default:
		return p.record(nil, fmt.Errorf("worker: publish %s: %w", subject, err))
	}
}

// Flush waits until every message published so far is acked by the stream and
// returns nil, or returns the first failure (sticky) or ctx's error. After nil
// every message is durable in the stream and the task may be acked.
func (p *Publisher) Flush(ctx context.Context) error {
	for len(p.queue) > 0 && p.err == nil {
		if err := p.settleOldest(ctx); err != nil {
			return err
		}
	}
	return p.err
}

// Pending is the number of messages published but not yet settled by Flush
// or by a full window.
func (p *Publisher) Pending() int { return len(p.queue) }

// Stats returns counts of settled messages.
func (p *Publisher) Stats() PublisherStats { return p.stats }

// settleOldest waits for the oldest message's ack, republishing it after a
// lost ack, and removes it from the queue.
func (p *Publisher) settleOldest(ctx context.Context) error {
	pp := p.queue[0]
	p.queue[0] = pendingPub{}
	p.queue = p.queue[1:]
	t := time.NewTimer(p.o.ackTimeout)
	defer t.Stop()
	var cause error
	select {
	case ack := <-pp.fut.Ok():
		return p.record(ack, nil)
	case err := <-pp.fut.Err():
		if !transient(err) {
			return p.record(nil, fmt.Errorf("worker: publish %s: %w", pp.msg.Subject, err))
		}
		cause = err
	case <-t.C:
		cause = jetstream.ErrAsyncPublishTimeout
	case <-ctx.Done():
		return p.record(nil, fmt.Errorf("worker: publish %s: %w", pp.msg.Subject, ctx.Err()))
	}
	p.o.log.Warn("publish ack lost, republishing", "subject", pp.msg.Subject, "err", cause)
	p.stats.Retries++
	ack, err := publishRetry(ctx, p.js, pp.msg, p.o.ackTimeout, p.o.log)
	return p.record(ack, err)
}

// record counts an outcome and keeps the first failure.
func (p *Publisher) record(ack *jetstream.PubAck, err error) error {
	if err != nil {
		if p.err == nil {
			p.err = err
		}
		return err
	}
	if ack.Duplicate {
		p.stats.Duplicates++
	} else {
		p.stats.Stored++
	}
	return nil
}

// MarkedShards returns the shards of phase whose done marker is stored in the
// data stream: a teacher published all their records (or its task is still
// live and will be redelivered, since a task is acked only after every record
// and the marker are stored). A restarted coordinator must not publish their
// tasks again: a work-queue stream forgets the ids of the tasks it handed out
// once they are acked, so a republished task would be computed a second time.
func MarkedShards(ctx context.Context, js jetstream.JetStream, names Names, phase string) (map[int]bool, error) {
	if err := ValidatePhase(phase); err != nil {
		return nil, err
	}
	s, err := js.Stream(ctx, names.DataStream())
	if err != nil {
		return nil, fmt.Errorf("worker: data stream: %w", err)
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(names.DoneFilter(phase)))
	if err != nil {
		return nil, fmt.Errorf("worker: list the done markers of %s: %w", phase, err)
	}
	out := make(map[int]bool, len(info.State.Subjects))
	for subj := range info.State.Subjects {
		k, err := names.ParseDataSubject(subj)
		if err != nil || !k.Done || k.Phase != phase {
			continue // not a marker of ours; the filter should not let it through
		}
		out[k.Shard] = true
	}
	return out, nil
}

// StoredShard reports what the data stream holds of one shard: its done marker
// (nil when none is stored) and how many distinct record subjects it has (not
// counted, 0, when there is no marker). Each
// record of a shard has its own subject, so a marker that counts as many
// messages as there are records means the shard was published whole.
func StoredShard(ctx context.Context, js jetstream.JetStream, names Names, phase string, shard int) (marker []byte, records int, err error) {
	if err := ValidatePhase(phase); err != nil {
		return nil, 0, err
	}
	if shard < 0 {
		return nil, 0, fmt.Errorf("%w: shard %d", ErrInvalidOption, shard)
	}
	s, err := js.Stream(ctx, names.DataStream())
	if err != nil {
		return nil, 0, fmt.Errorf("worker: data stream: %w", err)
	}
	m, err := s.GetLastMsgForSubject(ctx, names.DoneSubject(phase, shard))
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
		return nil, 0, nil
	case err != nil:
		return nil, 0, fmt.Errorf("worker: done marker of %s shard %d: %w", phase, shard, err)
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(names.ShardFilter(phase, shard)))
	if err != nil {
		return nil, 0, fmt.Errorf("worker: records of %s shard %d: %w", phase, shard, err)
	}
	return m.Data, len(info.State.Subjects) - 1, nil // all but the marker
}
