package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// DeadLetter is the JSON record published to Names.DeadLetterSubject (and
// kept in the DeadStream) for a task that failed on every delivery.
type DeadLetter struct {
	TaskID     string    `json:"task_id,omitempty"`
	Phase      string    `json:"phase"`
	Payload    []byte    `json:"payload,omitempty"`           // the task payload (base64 in JSON)
	Truncated  bool      `json:"payload_truncated,omitempty"` // payload left out: the record would exceed max payload
	Error      string    `json:"error"`
	Deliveries int       `json:"deliveries"`
	Consumer   string    `json:"consumer"`
	StreamSeq  uint64    `json:"stream_seq"` // sequence of the task in the tasks stream
	Time       time.Time `json:"time"`
}

// deadLetterID is the Nats-Msg-Id of the dead letter of one task message, the
// same whoever writes it (the worker or WatchDeadLetters).
func deadLetterID(consumer string, seq uint64) string {
	return "dead/" + consumer + "/" + strconv.FormatUint(seq, 10)
}

// publishDeadLetter stores d on the dead-letter subject, dropping the payload
// if the record would not fit the max payload.
func publishDeadLetter(ctx context.Context, js jetstream.JetStream, names Names, d DeadLetter, attempt time.Duration, log *slog.Logger) error {
	m := &nats.Msg{Subject: names.DeadLetterSubject(), Header: nats.Header{}}
	m.Header.Set(jetstream.MsgIDHeader, deadLetterID(d.Consumer, d.StreamSeq))
	for {
		data, err := json.Marshal(d)
		if err != nil {
			return fmt.Errorf("worker: encode dead letter: %w", err)
		}
		m.Data = data
		if limit := MaxPayload(js.Conn()); limit > 0 && m.Size()-len(m.Subject) > limit && !d.Truncated {
			d.Payload, d.Truncated = nil, true
			continue
		}
		break
	}
	if _, err := publishRetry(ctx, js, m, attempt, log); err != nil {
		return fmt.Errorf("worker: dead letter of %s seq %d: %w", d.Consumer, d.StreamSeq, err)
	}
	return nil
}

// deadLetter records a task that failed on its last delivery and terminates it.
// If the record cannot be stored the task is nak'd instead: the server then
// gives up on it and emits the max-deliveries advisory WatchDeadLetters reads.
func (l *TaskLoop) deadLetter(ctx context.Context, msg jetstream.Msg, t Task, md *jetstream.MsgMetadata, herr error, log *slog.Logger) {
	d := DeadLetter{
		TaskID:     t.ID,
		Phase:      t.Phase,
		Payload:    t.Payload,
		Error:      herr.Error(),
		Deliveries: t.Delivered,
		Consumer:   l.consumer,
		StreamSeq:  md.Sequence.Stream,
		Time:       l.o.now().UTC(),
	}
	pctx, cancel := context.WithTimeout(ctx, l.o.cfg.AckWait)
	defer cancel()
	if err := publishDeadLetter(pctx, l.js, l.names, d, l.o.cfg.AckWait, l.o.log); err != nil {
		log.Error("task failed on last delivery and its dead letter was not stored", "err", herr, "dead_letter_err", err)
		_ = msg.Nak()
		return
	}
	log.Error("task failed on last delivery, dead-lettered", "err", herr)
	if err := msg.TermWithReason("dead-lettered"); err != nil {
		log.Warn("term failed", "err", err)
	}
}

// maxDeliveriesAdvisory is the part of the server's
// io.nats.jetstream.advisory.v1.max_deliver event used here.
type maxDeliveriesAdvisory struct {
	Type       string    `json:"type"`
	Time       time.Time `json:"timestamp"`
	Stream     string    `json:"stream"`
	Consumer   string    `json:"consumer"`
	StreamSeq  uint64    `json:"stream_seq"`
	Deliveries int       `json:"deliveries"`
}

// WatchDeadLetters turns the server's max-deliveries advisories of the task
// consumer consumerName into dead letters, for tasks whose worker died or hung
// on the last delivery (a TaskLoop writes its own dead letters when a handler
// fails): each is stored on the dead-letter subject (deduplicated with one the
// worker may have written) and passed to fn, if fn is not nil. It blocks until
// ctx ends and returns nil then; it returns an error if it cannot subscribe.
// Advisories emitted while nobody watches are not replayed. The server (2.15)
// notices an exhausted message of a pull consumer only when the consumer is
// next touched (a pull or an info request), so with every worker down the
// advisory waits for the first worker to come back.
func WatchDeadLetters(ctx context.Context, js jetstream.JetStream, names Names, consumerName string, fn func(DeadLetter), log *slog.Logger) error {
	if err := validateName(consumerName); err != nil {
		return err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	subj := "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES." + names.TasksStream() + "." + consumerName
	sub, err := js.Conn().SubscribeSync(subj)
	if err != nil {
		return fmt.Errorf("worker: watch dead letters: %w", err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	for {
		m, err := sub.NextMsgWithContext(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, nats.ErrConnectionClosed) || errors.Is(err, nats.ErrBadSubscription) {
				return fmt.Errorf("worker: watch dead letters: %w", err)
			}
			log.Warn("dead-letter advisory", "err", err)
			continue
		}
		var adv maxDeliveriesAdvisory
		if err := json.Unmarshal(m.Data, &adv); err != nil {
			log.Warn("bad max-deliveries advisory", "err", err)
			continue
		}
		d := DeadLetter{
			Error:      "max deliveries exceeded",
			Deliveries: adv.Deliveries,
			Consumer:   adv.Consumer,
			StreamSeq:  adv.StreamSeq,
			Time:       adv.Time,
		}
		if raw, err := getTaskMsg(ctx, js, names, adv.StreamSeq); err != nil {
			log.Warn("dead task message not readable", "stream_seq", adv.StreamSeq, "err", err)
		} else {
			d.Phase, _ = names.ParseTaskSubject(raw.Subject)
			d.TaskID = raw.Header.Get(taskIDHeader)
			d.Payload = raw.Data
		}
		if err := publishDeadLetter(ctx, js, names, d, 10*time.Second, log); err != nil && ctx.Err() == nil {
			log.Error("dead letter not stored", "stream_seq", adv.StreamSeq, "err", err)
		}
		if fn != nil {
			fn(d)
		}
	}
}

func getTaskMsg(ctx context.Context, js jetstream.JetStream, names Names, seq uint64) (*jetstream.RawStreamMsg, error) {
	s, err := js.Stream(ctx, names.TasksStream())
	if err != nil {
		return nil, err
	}
	return s.GetMsg(ctx, seq)
}
