package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strconv"
	"strings"
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
	listenSet  bool
	maxPayload int
	payloadSet bool
	name       string
	log        *slog.Logger
	cluster    *clusterOptions
	nkeys      []*server.NkeyUser
	tlsCert    string
	tlsKey     string
	insecure   bool
	anonymous  bool
	conf       *server.Options
}

// WithTLS serves TLS on the client port with this certificate (chain) and key (PEM files).
// Clients on this process connect in process, without TLS.
func WithTLS(certFile, keyFile string) ServerOption {
	return func(o *serverOptions) error {
		if certFile == "" || keyFile == "" {
			return fmt.Errorf("%w: TLS needs both a certificate and a key", ErrInvalidOption)
		}
		o.tlsCert, o.tlsKey = certFile, keyFile
		return nil
	}
}

// WithInsecurePlaintext allows listening beyond loopback without TLS, where anyone on the
// network path reads the run's data and, for password or token logins, the secrets.
func WithInsecurePlaintext() ServerOption {
	return func(o *serverOptions) error {
		o.insecure = true
		return nil
	}
}

// WithAllowAnonymous allows a server without authorization: anyone who reaches its port
// may read, write or delete any run on it. Without it, StartEmbedded refuses to start a
// server whose configuration does not require authentication.
func WithAllowAnonymous() ServerOption {
	return func(o *serverOptions) error {
		o.anonymous = true
		return nil
	}
}

// WithConfigFile starts from a nats-server configuration file (deploy/nats/auth.conf
// style); options given next to it (listen, max payload, store dir) override it.
func WithConfigFile(path string) ServerOption {
	return func(o *serverOptions) error {
		c, err := server.ProcessConfigFile(path)
		if err != nil {
			return fmt.Errorf("%w: nats-server config %s: %w", ErrInvalidOption, path, err)
		}
		o.conf = c
		return nil
	}
}

// authRequired reports whether a server with options so requires every client to
// authenticate.
func authRequired(so *server.Options) bool {
	configured := len(so.Nkeys) > 0 || len(so.Users) > 0 || so.Username != "" || so.Authorization != "" ||
		len(so.TrustedOperators) > 0 || len(so.TrustedKeys) > 0 || so.AuthCallout != nil
	return configured && so.NoAuthUser == ""
}

// clusterOptions are the route settings of a clustered server (WithCluster).
type clusterOptions struct {
	name   string
	host   string
	port   int
	routes []*url.URL
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
		o.listenSet = true
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
		o.payloadSet = true
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

// WithCluster makes the server a node of the JetStream cluster name: it
// listens for routes from the other nodes on host:port (port 0: a random free
// port, useful only for a node that others never dial) and dials routes, the
// nats-route://host:port URLs of the other nodes (its own may be listed too, so
// every node can be given the same list). Every node needs its own server
// name (WithServerName) and store directory. JetStream in a cluster needs at
// least three nodes to keep a quorum when one fails.
func WithCluster(name, host string, port int, routes []string) ServerOption {
	return func(o *serverOptions) error {
		if name == "" || strings.ContainsAny(name, " \t\r\n") {
			return fmt.Errorf("%w: cluster name %q (non-empty, no spaces)", ErrInvalidOption, name)
		}
		if host == "" {
			return fmt.Errorf("%w: empty cluster listen host", ErrInvalidOption)
		}
		if port < 0 || port > 65535 {
			return fmt.Errorf("%w: cluster port %d", ErrInvalidOption, port)
		}
		c := &clusterOptions{name: name, host: host, port: port}
		if port == 0 {
			c.port = -1
		}
		for _, r := range routes {
			r = strings.TrimSpace(r)
			if r == "" {
				continue
			}
			u, err := url.Parse(r)
			if err != nil {
				return fmt.Errorf("%w: route %q: %w", ErrInvalidOption, r, err)
			}
			if u.Scheme != "nats-route" && u.Scheme != "nats" || u.Host == "" || u.Port() == "" {
				return fmt.Errorf("%w: route %q: want nats-route://HOST:PORT", ErrInvalidOption, r)
			}
			c.routes = append(c.routes, u)
		}
		o.cluster = c
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
	srv       *server.Server
	url       string
	inProcURL string
	port      int
}

// StartEmbedded starts a nats-server in this process with JetStream storing
// under dir (the server creates dir/jetstream; "" takes the config file's store_dir).
// It refuses to start a server that would accept clients without authentication
// (see WithRoles, WithConfigFile, WithAllowAnonymous) or that would listen beyond
// loopback without TLS (WithTLS, WithInsecurePlaintext) and waits until it accepts
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
	sopts := &server.Options{}
	if o.conf != nil {
		c := *o.conf
		sopts = &c
		if !o.listenSet && sopts.Port == 0 {
			sopts.Port = server.DEFAULT_PORT
		}
		if dir == "" {
			dir = sopts.StoreDir
		}
	}
	if dir == "" {
		return nil, fmt.Errorf("%w: empty store dir", ErrInvalidOption)
	}
	if o.conf == nil || o.listenSet {
		sopts.Host, sopts.Port = o.host, o.port
	}
	if o.conf == nil || o.payloadSet {
		sopts.MaxPayload = int32(o.maxPayload)
	}
	if sopts.ServerName == "" {
		sopts.ServerName = o.name
	}
	sopts.JetStream, sopts.StoreDir, sopts.NoSigs = true, dir, true
	if o.nkeys != nil {
		sopts.Nkeys = append(sopts.Nkeys, o.nkeys...)
	}
	if !authRequired(sopts) && !o.anonymous {
		return nil, fmt.Errorf("%w: the server would accept clients without authentication; give it an authorization configuration (or allow anonymous clients explicitly)", ErrInvalidOption)
	}
	if o.tlsCert != "" {
		tc, err := server.GenTLSConfig(&server.TLSConfigOpts{CertFile: o.tlsCert, KeyFile: o.tlsKey})
		if err != nil {
			return nil, fmt.Errorf("%w: TLS: %w", ErrInvalidOption, err)
		}
		sopts.TLSConfig, sopts.TLSTimeout = tc, 2
	}
	tlsOn := sopts.TLSConfig != nil
	listenHost := sopts.Host
	if listenHost == "" {
		listenHost = "0.0.0.0" // nats-server's default: every interface
	}
	if !isLoopback(listenHost) && !tlsOn && !o.insecure {
		return nil, fmt.Errorf("%w: listening on %s (beyond loopback) without TLS exposes the run's data and logins to the network; serve TLS (certificate and key) or allow plaintext explicitly", ErrInvalidOption, listenHost)
	}
	if c := o.cluster; c != nil {
		if !isLoopback(c.host) && !o.insecure {
			return nil, fmt.Errorf("%w: cluster routes on %s (beyond loopback) are neither encrypted nor authenticated: anyone who reaches the port joins the cluster; keep them on a private network and allow plaintext explicitly", ErrInvalidOption, c.host)
		}
		sopts.Cluster = server.ClusterOpts{Name: c.name, Host: c.host, Port: c.port}
		sopts.Routes = c.routes
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
	host := sopts.Host
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		host = "127.0.0.1" // the URL is for clients in this process or on this host
	}
	scheme := "nats://"
	if tlsOn {
		scheme = "tls://"
	}
	hostPort := net.JoinHostPort(host, strconv.Itoa(addr.Port))
	e := &Embedded{
		srv:       srv,
		port:      addr.Port,
		url:       scheme + hostPort,
		inProcURL: "nats://" + hostPort,
	}
	o.log.Info("embedded nats-server ready", "url", e.url, "listen", addr.String(),
		"store", dir, "max_payload", sopts.MaxPayload, "auth_required", authRequired(sopts), "tls", tlsOn)
	if c := o.cluster; c != nil {
		listen := ""
		if a := srv.ClusterAddr(); a != nil {
			listen = a.String()
		}
		o.log.Info("cluster node", "server_name", sopts.ServerName, "cluster", c.name,
			"cluster_listen", listen, "routes", len(c.routes))
	}
	return e, nil
}

// URL is the client URL of the server, e.g. "nats://127.0.0.1:41234" ("tls://…" when it
// serves TLS). With an unspecified listen host (0.0.0.0) it names 127.0.0.1.
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
