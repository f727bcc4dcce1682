package worker

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// ErrShardNotInStream says the data stream ran out of a shard's messages before the reader
// had all it needed (they were purged, or lost by the server).
var ErrShardNotInStream = errors.New("worker: the data stream does not hold all of the shard's messages")

// Bounds of ReadShard: each request waits at most readShardRequest, and failed requests
// are retried until none has been answered for readShardStall.
var (
	readShardRequest = 5 * time.Second
	readShardStall   = time.Minute
)

// StoredMsg wraps a message read from the stream directly rather than delivered by a
// consumer (ReadShard): there is no delivery to settle, and its Ack, AckSync, Nak,
// NakWithDelay, Term and InProgress do nothing.
func StoredMsg(subject string, header nats.Header, data []byte) Msg {
	return Msg{Subject: subject, Header: header, Data: data, Delivered: 1}
}

// ReadShard hands fn, in stream order, the messages the data stream holds for one shard
// of phase (its records and done markers, duplicates and every attempt included), until fn
// returns true. It reads them by direct requests — the next message on the shard's
// subjects from a sequence on — so it creates nothing on the server and holds no
// subscription: unlike an ordered consumer (whose re-creation after a server's loss can
// block, ignoring every context) it is bounded. Each request waits at most 5 s; failed
// requests (a server restarting, a leader election) are retried, and after a minute
// without an answer ReadShard gives up with the last failure.
//
// It returns nil once fn returned true; fn's error; an error wrapping ErrShardNotInStream
// when the shard's messages ran out first; or one wrapping ctx's error when ctx ended.
func ReadShard(ctx context.Context, js jetstream.JetStream, names Names, phase string, shard int, fn func(Msg) (done bool, err error)) error {
	if err := ValidatePhase(phase); err != nil {
		return err
	}
	if shard < 0 || js == nil || fn == nil {
		return fmt.Errorf("%w: shard %d, JetStream or fn missing", ErrInvalidOption, shard)
	}
	filter := names.ShardFilter(phase, shard)
	var (
		stream jetstream.Stream
		seq    = uint64(1)
		read   int
		failed time.Time // when the failures since the last answer began
		wait   = retryMinWait
	)
	for {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("worker: read %s shard %d: %w", phase, shard, err)
		}
		rctx, cancel := context.WithTimeout(ctx, readShardRequest)
		var raw *jetstream.RawStreamMsg
		var err error
		if stream == nil {
			stream, err = js.Stream(rctx, names.DataStream())
		}
		if err == nil {
			raw, err = stream.GetMsg(rctx, seq, jetstream.WithGetMsgSubject(filter))
		}
		cancel()
		switch {
		case err == nil:
			failed, wait = time.Time{}, retryMinWait
			read++
			done, ferr := fn(StoredMsg(raw.Subject, raw.Header, raw.Data))
			if ferr != nil || done {
				return ferr
			}
			seq = raw.Sequence + 1
			continue
		case errors.Is(err, jetstream.ErrMsgNotFound):
			return fmt.Errorf("%w: %s shard %d: %d messages, none after sequence %d", ErrShardNotInStream, phase, shard, read, seq-1)
		case ctx.Err() != nil:
			return fmt.Errorf("worker: read %s shard %d: %w", phase, shard, ctx.Err())
		case !transient(err):
			return fmt.Errorf("worker: read %s shard %d: %w", phase, shard, err)
		}
		if failed.IsZero() {
			failed = time.Now()
		}
		if time.Since(failed) >= readShardStall {
			return fmt.Errorf("worker: read %s shard %d: the data stream did not answer for %v: %w", phase, shard, readShardStall, err)
		}
		if err := SleepCtx(ctx, wait); err != nil {
			return fmt.Errorf("worker: read %s shard %d: %w", phase, shard, err)
		}
		wait = min(2*wait, retryMaxWait)
	}
}
