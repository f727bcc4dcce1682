package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// Payload limits of the embedded server.
const (
	// DefaultMaxPayload is nats-server's default max_payload (1 MiB), also the
	// default of an external server.
	DefaultMaxPayload = 1 << 20
	// MaxMaxPayload is the largest max_payload the embedded server accepts: the
	// server's default max_pending (64 MiB). nats-server warns above 8 MiB.
	MaxMaxPayload = 64 << 20
)

// ServerOption configures StartEmbedded.
type ServerOption func(*serverOptions) error

type serverOptions struct {
	host       string
	port       int // -1: random free port
	maxPayload int
	name       string
	log        *slog.Logger
}

// WithListen sets the client listen address. The default is 127.0.0.1 on a
// random free port; use host "0.0.0.0" and a fixed port (e.g. 4222) so teachers
// on other machines or network namespaces can connect. Port 0 means a random
// free port.
func WithListen(host string, port int) ServerOption {
	return func(o *serverOptions) error {
		if host == "" {
			return fmt.Errorf("%w: empty listen host", ErrInvalidOption)
		}
		if port < 0 || port > 65535 {
			return fmt.Errorf("%w: listen port %d", ErrInvalidOption, port)
		}
		o.host = host
		o.port = port
		if port == 0 {
			o.port = -1
		}
		return nil
	}
}

// WithMaxPayload sets the server's max_payload in bytes, 1..MaxMaxPayload
// (default DefaultMaxPayload). Clients read it with MaxPayload.
func WithMaxPayload(n int) ServerOption {
	return func(o *serverOptions) error {
		if n <= 0 || n > MaxMaxPayload {
			return fmt.Errorf("%w: max payload %d (want 1..%d)", ErrInvalidOption, n, MaxMaxPayload)
		}
		o.maxPayload = n
		return nil
	}
}

// WithServerName sets the server name shown in logs and monitoring
// (default "linearpatch").
func WithServerName(name string) ServerOption {
	return func(o *serverOptions) error {
		if name == "" {
			return fmt.Errorf("%w: empty server name", ErrInvalidOption)
		}
		o.name = name
		return nil
	}
}

// WithServerLogger sends the server's log to l (default: discarded). Server
// debug lines are logged at slog.LevelDebug, traces are never enabled.
func WithServerLogger(l *slog.Logger) ServerOption {
	return func(o *serverOptions) error {
		if l == nil {
			return fmt.Errorf("%w: nil logger", ErrInvalidOption)
		}
		o.log = l
		return nil
	}
}

// Embedded is an in-process nats-server with JetStream on a file store.
type Embedded struct {
	srv  *server.Server
	url  string
	port int
}

// StartEmbedded starts a nats-server in this process with JetStream storing
// under dir (the server creates dir/jetstream) and waits until it accepts
// connections or ctx ends. ctx bounds only the start; the server runs until
// Shutdown. Starting a new server on the same dir (and port) after Shutdown
// recovers every stream, consumer and bucket. Errors wrap ErrInvalidOption or
// ErrServerStart.
func StartEmbedded(ctx context.Context, dir string, opts ...ServerOption) (*Embedded, error) {
	o := serverOptions{
		host:       "127.0.0.1",
		port:       -1,
		maxPayload: DefaultMaxPayload,
		name:       "linearpatch",
		log:        slog.New(slog.DiscardHandler),
	}
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	if dir == "" {
		return nil, fmt.Errorf("%w: empty store dir", ErrInvalidOption)
	}
	sopts := &server.Options{
		ServerName: o.name,
		Host:       o.host,
		Port:       o.port,
		MaxPayload: int32(o.maxPayload),
		JetStream:  true,
		StoreDir:   dir,
		NoSigs:     true,
	}
	srv, err := server.NewServer(sopts)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrServerStart, err)
	}
	adapter := slogAdapter{l: o.log, fatal: make(chan string, 1)}
	srv.SetLoggerV2(adapter, o.log.Enabled(ctx, slog.LevelDebug), false, false)
	// Start recovers the JetStream store synchronously and starts the accept
	// loop in the background; a fatal error (port in use, store locked) is only
	// logged, so it is caught through the adapter.
	srv.Start()
	fail := func(err error) (*Embedded, error) {
		srv.Shutdown()
		srv.WaitForShutdown()
		return nil, fmt.Errorf("%w: %w", ErrServerStart, err)
	}
	for !srv.ReadyForConnections(50 * time.Millisecond) {
		select {
		case msg := <-adapter.fatal:
			return fail(errors.New(msg))
		case <-ctx.Done():
			return fail(ctx.Err())
		default:
		}
	}
	addr, ok := srv.Addr().(*net.TCPAddr)
	if !ok {
		return fail(errors.New("no client listener"))
	}
	host := o.host
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		host = "127.0.0.1" // the URL is for clients in this process or on this host
	}
	e := &Embedded{
		srv:  srv,
		port: addr.Port,
		url:  "nats://" + net.JoinHostPort(host, strconv.Itoa(addr.Port)),
	}
	o.log.Info("embedded nats-server ready", "url", e.url, "listen", addr.String(),
		"store", dir, "max_payload", o.maxPayload)
	return e, nil
}

// URL is the client URL of the server, e.g. "nats://127.0.0.1:41234". With an
// unspecified listen host (0.0.0.0) it names 127.0.0.1.
func (e *Embedded) URL() string { return e.url }

// Port is the client port the server listens on.
func (e *Embedded) Port() int { return e.port }

// Shutdown stops the server, closing client connections, and waits until it
// has stopped and flushed its store. It is safe to call more than once.
func (e *Embedded) Shutdown() {
	e.srv.Shutdown()
	e.srv.WaitForShutdown()
}

// slogAdapter implements server.Logger on a *slog.Logger. Fatal messages are
// also offered (without blocking) on fatal, so StartEmbedded can fail fast.
type slogAdapter struct {
	l     *slog.Logger
	fatal chan string
}

const levelTrace = slog.LevelDebug - 4

func (a slogAdapter) log(level slog.Level, format string, v []any) {
	if !a.l.Enabled(context.Background(), level) {
		return
	}
	a.l.Log(context.Background(), level, fmt.Sprintf(format, v...), "component", "nats-server")
}

func (a slogAdapter) Noticef(format string, v ...any) { a.log(slog.LevelInfo, format, v) }
func (a slogAdapter) Warnf(format string, v ...any)   { a.log(slog.LevelWarn, format, v) }

// Fatalf logs at error level; the embedded server never exits the process.
func (a slogAdapter) Fatalf(format string, v ...any) {
	a.log(slog.LevelError, format, v)
	select {
	case a.fatal <- fmt.Sprintf(format, v...):
	default:
	}
}
func (a slogAdapter) Errorf(format string, v ...any) { a.log(slog.LevelError, format, v) }
func (a slogAdapter) Debugf(format string, v ...any) { a.log(slog.LevelDebug, format, v) }
func (a slogAdapter) Tracef(format string, v ...any) { a.log(levelTrace, format, v) }
