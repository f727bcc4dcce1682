package worker

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// TestObjectReadDeadline: a read of an object may take ObjectReadTimeout of its size in
// all. nats.go counts its 5 s default from the Get for a context without a deadline, so a
// big object over a slow link (simulated: a reader that starts 5.5 s after the Get) always
// failed; under ObjectContext the same read succeeds. GetObject reads an object whole and
// names a missing one.
func TestObjectReadDeadline(t *testing.T) {
	if got := ObjectReadTimeout(64 << 20); got != 13*time.Second {
		t.Errorf("ObjectReadTimeout(64 MiB) = %v, want 13s (5 s + 64 MiB at 8 MiB/s)", got)
	}
	_, _, js, names := setupRun(t, StreamConfig{})
	ctx := t.Context()
	obj, err := js.ObjectStore(ctx, names.GradStore())
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("linearpatch"), 3<<20) // 33 MiB: 9 s at MinObjectRate
	if _, err := obj.PutBytes(ctx, "big", data); err != nil {
		t.Fatal(err)
	}
	read := func(ctx context.Context) error {
		r, err := obj.Get(ctx, "big")
		if err != nil {
			return err
		}
		defer r.Close()
		time.Sleep(5500 * time.Millisecond) // a slow link: the bytes arrive late
		var b bytes.Buffer
		if _, err := b.ReadFrom(r); err != nil {
			return err
		}
		if !bytes.Equal(b.Bytes(), data) {
			return errors.New("other bytes")
		}
		return nil
	}
	plain := make(chan error, 1)
	go func() { plain <- read(ctx) }() // alongside, to keep the test short
	rctx, cancel := ObjectContext(ctx, uint64(len(data)))
	defer cancel()
	if err := read(rctx); err != nil {
		t.Errorf("a read under ObjectContext that takes 5.5 s: %v", err)
	}
	t.Logf("the same read with nats.go's default deadline: %v", <-plain)
	b, info, err := GetObject(ctx, obj, "big")
	if err != nil || !bytes.Equal(b, data) || info.Size != uint64(len(data)) {
		t.Errorf("GetObject: %d bytes, %v", len(b), err)
	}
	if _, _, err := GetObject(ctx, obj, "missing"); !errors.Is(err, jetstream.ErrObjectNotFound) {
		t.Errorf("GetObject of a missing object: %v, want ErrObjectNotFound", err)
	}
}
