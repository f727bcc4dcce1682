package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"linearpatch/internal/atomicfile"
	"linearpatch/worker"
)

// addNATSFlags declares how a pipeline command reaches NATS. Only the commands that use
// them add addEmbeddedNATSFlags (run, coordinator) and addTaskFlags (run, coordinator,
// teacher): a command accepts no flag it ignores.
func addNATSFlags(cmd *cobra.Command) {
	f := cmd.Flags()
	f.String("nats", "", "external NATS server or cluster URL(s), e.g. nats://host:4222 (default: embedded server)")
	f.String("nats-user", "", "NATS user")
	f.String("nats-password", "", "NATS password")
	f.String("nats-token", "", "NATS token")
	f.String("nats-nkey", "", "NATS nkey seed file, e.g. a role file of RUN-DIR/creds/ (default with --run-dir: RUN-DIR/creds/ROLE.nk when present)")
	f.String("nats-creds", "", "NATS credentials (JWT) file")
	f.String("nats-tls-cert", "", "TLS certificate: the client's with --nats, the embedded server's otherwise (it then serves TLS)")
	f.String("nats-tls-key", "", "TLS key of --nats-tls-cert")
	f.String("nats-tls-ca", "", "TLS CA certificate")
}

// addEmbeddedNATSFlags declares the embedded server's settings (run, coordinator).
func addEmbeddedNATSFlags(cmd *cobra.Command) {
	f := cmd.Flags()
	f.String("nats-listen", "127.0.0.1:0", "embedded server's listen address (host:port; port 0 picks a free one); beyond loopback it needs --nats-tls-cert/--nats-tls-key or --nats-insecure-plaintext")
	f.Bool("nats-insecure-plaintext", false, "INSECURE: let the embedded server listen beyond loopback without TLS (anyone on the network path reads the run's data)")
	f.Int("nats-max-payload", 0, "embedded server's max_payload in bytes (0: the server default, 1 MiB)")
}

// addTaskFlags declares the shard tasks' redelivery settings (run, coordinator, teacher).
func addTaskFlags(cmd *cobra.Command) {
	f := cmd.Flags()
	f.Duration("ack-wait", 60*time.Second, "how long a teacher may hold a shard task without reporting before it is redelivered")
	f.Int("max-deliver", 5, "deliveries of a shard task before it is dead-lettered")
}

// natsConn is a connection to the run's NATS, and the embedded server when there is one.
type natsConn struct {
	nc       *nats.Conn
	js       jetstream.JetStream
	embedded *worker.Embedded
	creds    *worker.Credentials // the run's role keys, when the server is embedded
	url      string
	extra    []*nats.Conn // role connections opened by as
}

func (c *natsConn) Close() {
	for _, nc := range c.extra {
		nc.Close()
	}
	c.nc.Close()
	if c.embedded != nil {
		c.embedded.Shutdown()
	}
}

// as returns a connection for an in-process worker of role r: its own connection with the
// role's key on an embedded server (so the server enforces the role), c's otherwise.
func (c *natsConn) as(ctx context.Context, r worker.Role, name string) (*nats.Conn, jetstream.JetStream, error) {
	if c.creds == nil {
		return c.nc, c.js, nil
	}
	nc, err := worker.ConnectInProcess(ctx, c.embedded, c.creds, r, worker.ConnOptions{Name: name, Logger: slog.Default()})
	if err != nil {
		return nil, nil, err
	}
	c.extra = append(c.extra, nc)
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, nil, err
	}
	return nc, js, nil
}

// credsDir is the directory of a run directory that holds its role keys.
func credsDir(runDir string) string { return filepath.Join(runDir, "creds") }

// connectNATS connects to --nats as role, or, when --nats is empty and embed names the run,
// starts the embedded server storing under runDir/nats and connects in process. The embedded
// server requires the run's role keys (created in runDir/creds on first start, one 0600 nkey
// seed file per role) and writes its URL to runDir/nats.url for the other commands. A
// process joining with --run-dir and no login flag logs in with RUN-DIR/creds/ROLE.nk.
func connectNATS(ctx context.Context, s settings, runDir string, embed *worker.Names, role worker.Role, name string) (*natsConn, error) {
	c := &natsConn{url: s.str("nats")}
	if c.url == "" {
		if embed == nil {
			if runDir != "" {
				if b, err := os.ReadFile(filepath.Join(runDir, "nats.url")); err == nil {
					c.url = string(b)
				}
			}
			if c.url == "" {
				return nil, errors.New("--nats is required (or --run-dir of a run whose embedded server is up)")
			}
		} else {
			return startEmbedded(ctx, s, runDir, *embed, name)
		}
	}
	o := worker.ConnOptions{URL: c.url, User: s.str("nats-user"), Password: s.str("nats-password"),
		Token: s.str("nats-token"), NKeyFile: s.str("nats-nkey"), CredsFile: s.str("nats-creds"),
		TLSCert: s.str("nats-tls-cert"), TLSKey: s.str("nats-tls-key"), TLSCA: s.str("nats-tls-ca"),
		Name: name, Logger: slog.Default()}
	if o.User == "" && o.Token == "" && o.NKeyFile == "" && o.CredsFile == "" && runDir != "" {
		if f := worker.CredsFile(credsDir(runDir), role); fileExists(f) {
			o.NKeyFile = f
			slog.Info("logging in with the run's role key", "role", role, "file", f)
		}
	}
	nc, err := worker.Connect(ctx, o)
	if err != nil {
		return nil, err
	}
	c.nc = nc
	if c.js, err = jetstream.New(nc); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func fileExists(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.Mode().IsRegular()
}

// startEmbedded starts the run's embedded server with its role keys and connects to it in
// process as the coordinator.
func startEmbedded(ctx context.Context, s settings, runDir string, names worker.Names, name string) (*natsConn, error) {
	host, portStr, err := net.SplitHostPort(s.str("nats-listen"))
	if err != nil {
		return nil, fmt.Errorf("--nats-listen: %w", err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return nil, fmt.Errorf("--nats-listen port: %w", err)
	}
	dir := credsDir(runDir)
	creds, err := worker.LoadOrCreateCredentials(dir)
	if err != nil {
		return nil, err
	}
	opts := []worker.ServerOption{worker.WithListen(host, port), worker.WithServerLogger(slog.Default()), worker.WithRoles(creds, names)}
	if mp := s.num("nats-max-payload"); mp > 0 {
		opts = append(opts, worker.WithMaxPayload(mp))
	}
	if cert, key := s.str("nats-tls-cert"), s.str("nats-tls-key"); cert != "" || key != "" {
		opts = append(opts, worker.WithTLS(cert, key))
	}
	if s.flag("nats-insecure-plaintext") {
		opts = append(opts, worker.WithInsecurePlaintext())
	}
	e, err := worker.StartEmbedded(ctx, filepath.Join(runDir, "nats"), opts...)
	if err != nil {
		return nil, err
	}
	c := &natsConn{embedded: e, creds: creds, url: e.URL()}
	if c.nc, err = worker.ConnectInProcess(ctx, e, creds, worker.RoleCoordinator, worker.ConnOptions{Name: name, Logger: slog.Default()}); err != nil {
		e.Shutdown()
		return nil, err
	}
	if c.js, err = jetstream.New(c.nc); err != nil {
		c.Close()
		return nil, err
	}
	// Atomically: other processes poll for this file and read it as soon as it exists.
	if err := atomicfile.Write(filepath.Join(runDir, "nats.url"), []byte(c.url), 0o644); err != nil {
		c.Close()
		return nil, err
	}
	slog.Info("embedded NATS server", "url", c.url, "store", filepath.Join(runDir, "nats"))
	slog.Info("the server requires the run's role keys: copy a role's file to the machine that runs it and pass it with --nats-nkey",
		"dir", dir, "roles", "teacher.nk, cache.nk, student.nk, status.nk")
	return c, nil
}

func streamConfig(s settings) worker.StreamConfig {
	return worker.StreamConfig{AckWait: s.v.GetDuration("ack-wait"), MaxDeliver: s.num("max-deliver"), Replicas: s.num("replicas")}
}

// setupConfig is the StreamConfig that run and coordinator give worker.Setup. A run that
// already exists on the server keeps the replicas of its streams and buckets unless
// --replicas is given explicitly (flag, config file or environment): a resumed run
// started without it would otherwise be scaled to the default of 1. An explicit change is
// logged.
func setupConfig(ctx context.Context, s settings, js jetstream.JetStream, names worker.Names) (worker.StreamConfig, error) {
	sc := streamConfig(s)
	have, exists, err := worker.RunReplicas(ctx, js, names)
	if err != nil {
		return sc, err
	}
	switch {
	case !exists:
	case !s.v.IsSet("replicas"):
		sc.Replicas = 0 // Setup keeps the run's
		if have != s.num("replicas") {
			slog.Info("the resumed run keeps the replicas of its streams and buckets (give --replicas to change them)", "replicas", have)
		}
	case have != sc.Replicas:
		slog.Warn("changing the replicas of the run's streams and buckets, as --replicas asks", "from", have, "to", sc.Replicas)
	}
	return sc, nil
}

// checkReplicas rejects a --replicas (of run and coordinator, the commands that create a
// run's streams and buckets; the other commands leave it 0, StreamConfig's default of 1)
// the run's server cannot hold: 1..5, and above 1 only on an external cluster (--nats),
// since the embedded server is a single node.
func checkReplicas(s settings) error {
	r := s.num("replicas")
	if r < 1 || r > 5 {
		return fmt.Errorf("--replicas %d: want 1..5 (3 for a three-node cluster)", r)
	}
	if r > 1 && s.str("nats") == "" {
		return fmt.Errorf("--replicas %d needs a JetStream cluster of at least %d nodes (--nats); the embedded server is a single node", r, r)
	}
	if s.str("nats") != "" {
		for _, k := range []string{"nats-listen", "nats-max-payload", "nats-insecure-plaintext"} {
			if s.v.IsSet(k) {
				return fmt.Errorf("--%s sets up the embedded server, which --nats replaces: give one or the other", k)
			}
		}
	}
	return nil
}
