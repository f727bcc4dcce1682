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

// transient reports whether err is a connection-level failure (server gone,
// restarting, JetStream not ready yet, reply lost) that a retry after the
// client reconnects may cure. A JetStream API error is transient only if it is
// a 5xx; errors the server gave for the message itself are not.
func transient(err error) bool {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		return apiErr.Code >= 500
	}
	for _, t := range []error{
		nats.ErrTimeout, nats.ErrDisconnected, nats.ErrNoResponders,
		nats.ErrConnectionReconnecting, nats.ErrNoServers,
		jetstream.ErrNoStreamResponse, jetstream.ErrAsyncPublishTimeout,
		jetstream.ErrTooManyStalledMsgs, context.DeadlineExceeded,
	} {
		if errors.Is(err, t) {
			return true
		}
	}
	return false
}

// Transient reports whether err is a connection-level failure that a retry after the
// client reconnects may cure (see transient), for callers that retry on their own.
func Transient(err error) bool { return transient(err) }

const (
	retryMinWait = 100 * time.Millisecond
	retryMaxWait = 2 * time.Second
)

// publishRetry publishes m synchronously, retrying transient failures with a
// capped exponential pause until it is acked, a permanent error occurs or ctx
// ends. Each attempt waits at most attempt for the ack. m must carry a
// Nats-Msg-Id so that an attempt whose ack was lost is stored once.
func publishRetry(ctx context.Context, js jetstream.JetStream, m *nats.Msg, attempt time.Duration, log *slog.Logger) (*jetstream.PubAck, error) {
	wait := retryMinWait
	for try := 1; ; try++ {
		actx, cancel := context.WithTimeout(ctx, attempt)
		// A fresh Msg each time: the client must not see a half-used one.
		ack, err := js.PublishMsg(actx, &nats.Msg{Subject: m.Subject, Header: m.Header, Data: m.Data})
		cancel()
		if err == nil {
			return ack, nil
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("worker: publish %s: %w (last error: %w)", m.Subject, ctx.Err(), err)
		}
		if !transient(err) {
			return nil, fmt.Errorf("worker: publish %s: %w", m.Subject, err)
		}
		log.Warn("publish failed, retrying", "subject", m.Subject, "try", try, "err", err)
		if err := SleepCtx(ctx, wait); err != nil {
			return nil, fmt.Errorf("worker: publish %s: %w", m.Subject, err)
		}
		wait = min(2*wait, retryMaxWait)
	}
}

// SleepCtx pauses for d or until ctx ends, returning ctx.Err() in that case.
func SleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
