package worker

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestStartEmbedded(t *testing.T) {
	for _, tc := range []struct {
		name       string
		opts       []ServerOption
		maxPayload int
		urlPrefix  string
	}{
		{"defaults", nil, DefaultMaxPayload, "nats://127.0.0.1:"},
		{"8MiB payload", []ServerOption{WithMaxPayload(8 << 20)}, 8 << 20, "nats://127.0.0.1:"},
		{"all interfaces", []ServerOption{WithListen("0.0.0.0", 0), WithInsecurePlaintext()}, DefaultMaxPayload, "nats://127.0.0.1:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := startServer(t, tc.opts...)
			if !strings.HasPrefix(e.URL(), tc.urlPrefix) || e.Port() == 0 {
				t.Fatalf("URL %q, port %d", e.URL(), e.Port())
			}
			nc, js := connect(t, e.URL())
			if got := MaxPayload(nc); got != tc.maxPayload {
				t.Fatalf("MaxPayload = %d, want %d", got, tc.maxPayload)
			}
			if _, err := js.AccountInfo(t.Context()); err != nil {
				t.Fatalf("JetStream not enabled: %v", err)
			}
			e.Shutdown()
			waitFor(t, 5*time.Second, "client to see the shutdown", func() bool { return !nc.IsConnected() })
			e.Shutdown() // idempotent
		})
	}
}

func TestStartEmbeddedErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		dir  string
		opts []ServerOption
	}{
		{"empty dir", "", nil},
		{"zero payload", "d", []ServerOption{WithMaxPayload(0)}},
		{"huge payload", "d", []ServerOption{WithMaxPayload(MaxMaxPayload + 1)}},
		{"empty host", "d", []ServerOption{WithListen("", 4222)}},
		{"bad port", "d", []ServerOption{WithListen("127.0.0.1", 70000)}},
		{"nil logger", "d", []ServerOption{WithServerLogger(nil)}},
		{"no authorization", "d", nil},
		{"all interfaces without TLS", "d", []ServerOption{WithAllowAnonymous(), WithListen("0.0.0.0", 0)}},
		{"a LAN address without TLS", "d", []ServerOption{WithAllowAnonymous(), WithListen("192.0.2.1", 0)}},
		{"TLS without key", "d", []ServerOption{WithAllowAnonymous(), WithTLS("cert.pem", "")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := tc.dir
			if dir != "" {
				dir = t.TempDir()
			}
			e, err := StartEmbedded(t.Context(), dir, tc.opts...)
			if !errors.Is(err, ErrInvalidOption) {
				if e != nil {
					e.Shutdown()
				}
				t.Fatalf("err = %v, want ErrInvalidOption", err)
			}
		})
	}
}

func TestStartEmbeddedPortInUse(t *testing.T) {
	a := startServer(t)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	b, err := StartEmbedded(ctx, t.TempDir(), WithListen("127.0.0.1", a.Port()), WithServerLogger(testLogger()), WithAllowAnonymous())
	if err == nil {
		b.Shutdown()
		t.Fatal("second server on the same port started")
	}
	if !errors.Is(err, ErrServerStart) || ctx.Err() != nil {
		t.Fatalf("err = %v (ctx %v), want ErrServerStart before the deadline", err, ctx.Err())
	}
}
