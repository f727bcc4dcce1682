package worker

import (
	"bytes"
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// MinObjectRate is the slowest link to the server an object read is given time for: a
// read of n bytes may take ObjectReadTimeout(n).
const MinObjectRate = 8 << 20 // bytes per second

// ObjectReadTimeout is how long reading an object of size bytes may take in all: the
// client's default API timeout (5 s) plus the time to move it at MinObjectRate.
//
// nats.go's object store gives a read whose context has no deadline its default API
// timeout *in all*, counted from the Get: a d×d gradient of a 7–8B model (64 MiB) or its
// checkpoint (320 MiB) read from another machine would always fail.
func ObjectReadTimeout(size uint64) time.Duration {
	return 5*time.Second + time.Duration(float64(size)/MinObjectRate*float64(time.Second))
}

// ObjectContext returns ctx with the deadline of a read of an object of size bytes
// (ObjectReadTimeout), or ctx itself when it has a deadline already.
func ObjectContext(ctx context.Context, size uint64) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, ObjectReadTimeout(size))
}

// GetObject reads object name of obj whole, with a deadline sized to it (ObjectContext).
// Errors wrap jetstream.ErrObjectNotFound when there is no such object.
func GetObject(ctx context.Context, obj jetstream.ObjectStore, name string) ([]byte, *jetstream.ObjectInfo, error) {
	info, err := obj.GetInfo(ctx, name)
	if err != nil {
		return nil, nil, fmt.Errorf("object %s: %w", name, err)
	}
	rctx, cancel := ObjectContext(ctx, info.Size)
	defer cancel()
	r, err := obj.Get(rctx, name)
	if err != nil {
		return nil, nil, fmt.Errorf("object %s: %w", name, err)
	}
	defer r.Close()
	var buf bytes.Buffer
	buf.Grow(int(info.Size))
	if _, err := buf.ReadFrom(r); err != nil {
		return nil, nil, fmt.Errorf("object %s: %w", name, err)
	}
	ri, err := r.Info()
	if err != nil {
		return nil, nil, fmt.Errorf("object %s: %w", name, err)
	}
	return buf.Bytes(), ri, nil
}
