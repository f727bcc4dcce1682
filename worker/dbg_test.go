package worker

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

func TestDbgAdvisory(t *testing.T) {
	_, nc, js, names := setupRun(t, StreamConfig{})
	sub, _ := nc.SubscribeSync("$JS.EVENT.ADVISORY.>")
	cons, err := js.CreateOrUpdateConsumer(t.Context(), names.TasksStream(), jetstream.ConsumerConfig{
		Durable: "teachers", AckPolicy: jetstream.AckExplicitPolicy, AckWait: 200 * time.Millisecond,
		MaxDeliver: 2, FilterSubject: names.TaskSubject("acts"),
	})
	if err != nil {
		t.Fatal(err)
	}
	publishTasks(t, js, names, "acts", 1)
	for i := range 3 {
		m, err := cons.Next(jetstream.FetchMaxWait(1 * time.Second))
		t.Logf("fetch %d: %v %v", i, m != nil, err)
	}
	for {
		m, err := sub.NextMsg(500 * time.Millisecond)
		if err != nil {
			break
		}
		t.Logf("%s %s", m.Subject, m.Data)
	}
}
