package worker

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestConnOptionsValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		o    ConnOptions
		ok   bool
	}{
		{"url only", ConnOptions{URL: "nats://h:4222"}, true},
		{"cluster", ConnOptions{URL: "nats://a:4222, tls://b:4222"}, true},
		{"user", ConnOptions{URL: "nats://h:4222", User: "u", Password: "p"}, true},
		{"token", ConnOptions{URL: "nats://h:4222", Token: "t"}, true},
		{"creds+tls", ConnOptions{URL: "tls://h:4222", CredsFile: "c", TLSCert: "c", TLSKey: "k", TLSCA: "ca"}, true},
		{"empty", ConnOptions{}, false},
		{"bad scheme", ConnOptions{URL: "http://h:4222"}, false},
		{"no host", ConnOptions{URL: "nats://"}, false},
		{"password alone", ConnOptions{URL: "nats://h", Password: "p"}, false},
		{"two auths", ConnOptions{URL: "nats://h", Token: "t", NKeyFile: "n"}, false},
		{"cert without key", ConnOptions{URL: "nats://h", TLSCert: "c"}, false},
		{"negative wait", ConnOptions{URL: "nats://h", ReconnectWait: -1}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := tc.o
			err := o.Validate()
			if (err == nil) != tc.ok {
				t.Fatalf("Validate = %v, want ok=%v", err, tc.ok)
			}
			if err != nil && !errors.Is(err, ErrInvalidOption) {
				t.Fatalf("%v does not wrap ErrInvalidOption", err)
			}
			if err == nil && (o.Name == "" || o.Logger == nil || o.ReconnectWait == 0) {
				t.Fatalf("defaults not filled: %+v", o)
			}
		})
	}
}

// Connect keeps dialing until a server comes up, and gives up with ctx.
func TestConnectWaitsForServer(t *testing.T) {
	dir := t.TempDir()
	first := startServerIn(t, dir)
	port := first.Port()
	first.Shutdown()

	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	_, err := Connect(ctx, ConnOptions{URL: first.URL(), ReconnectWait: 20 * time.Millisecond})
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Connect with no server = %v, want DeadlineExceeded", err)
	}

	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		nc, err := Connect(ctx, ConnOptions{URL: first.URL(), ReconnectWait: 20 * time.Millisecond})
		if err == nil {
			nc.Close()
		}
		done <- err
	}()
	time.Sleep(100 * time.Millisecond)
	startServerIn(t, dir, WithListen("127.0.0.1", port))
	if err := <-done; err != nil {
		t.Fatalf("Connect after the server came up: %v", err)
	}
}
