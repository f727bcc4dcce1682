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

	"linearpatch/worker"
)

// addNATSFlags declares how a pipeline command reaches NATS.
func addNATSFlags(cmd *cobra.Command) {
	f := cmd.Flags()
	f.String("nats", "", "external NATS server or cluster URL(s), e.g. nats://host:4222 (default: embedded server)")
	f.String("nats-listen", "127.0.0.1:0", "embedded server's listen address (host:port; port 0 picks a free one)")
	f.Int("nats-max-payload", 0, "embedded server's max_payload in bytes (0: the server default, 1 MiB)")
	f.String("nats-user", "", "NATS user")
	f.String("nats-password", "", "NATS password")
	f.String("nats-token", "", "NATS token")
	f.String("nats-nkey", "", "NATS nkey seed file")
	f.String("nats-creds", "", "NATS credentials (JWT) file")
	f.String("nats-tls-cert", "", "TLS client certificate")
	f.String("nats-tls-key", "", "TLS client key")
	f.String("nats-tls-ca", "", "TLS CA certificate")
	f.Duration("ack-wait", 60*time.Second, "how long a teacher may hold a shard task without reporting before it is redelivered")
	f.Int("max-deliver", 5, "deliveries of a shard task before it is dead-lettered")
}

// natsConn is a connection to the run's NATS, and the embedded server when there is one.
type natsConn struct {
	nc       *nats.Conn
	js       jetstream.JetStream
	embedded *worker.Embedded
	url      string
}

func (c *natsConn) Close() {
	c.nc.Close()
	if c.embedded != nil {
		c.embedded.Shutdown()
	}
}

// connectNATS connects to --nats, or starts the embedded server storing under
// runDir/nats when --nats is empty and embed is true, and writes its URL to
// runDir/nats.url for the other commands.
func connectNATS(ctx context.Context, s settings, runDir string, embed bool, name string) (*natsConn, error) {
	c := &natsConn{url: s.str("nats")}
	if c.url == "" {
		if !embed {
			if runDir != "" {
				if b, err := os.ReadFile(filepath.Join(runDir, "nats.url")); err == nil {
					c.url = string(b)
				}
			}
			if c.url == "" {
				return nil, errors.New("--nats is required (or --run-dir of a run whose embedded server is up)")
			}
		} else {
			host, portStr, err := net.SplitHostPort(s.str("nats-listen"))
			if err != nil {
				return nil, fmt.Errorf("--nats-listen: %w", err)
			}
			port, err := strconv.Atoi(portStr)
			if err != nil {
				return nil, fmt.Errorf("--nats-listen port: %w", err)
			}
			opts := []worker.ServerOption{worker.WithListen(host, port), worker.WithServerLogger(slog.Default())}
			if mp := s.num("nats-max-payload"); mp > 0 {
				opts = append(opts, worker.WithMaxPayload(mp))
			}
			e, err := worker.StartEmbedded(ctx, filepath.Join(runDir, "nats"), opts...)
			if err != nil {
				return nil, err
			}
			c.embedded, c.url = e, e.URL()
			if err := os.WriteFile(filepath.Join(runDir, "nats.url"), []byte(c.url), 0o644); err != nil {
				e.Shutdown()
				return nil, err
			}
			slog.Info("embedded NATS server", "url", c.url, "store", filepath.Join(runDir, "nats"))
		}
	}
	nc, err := worker.Connect(ctx, worker.ConnOptions{URL: c.url, User: s.str("nats-user"), Password: s.str("nats-password"),
		Token: s.str("nats-token"), NKeyFile: s.str("nats-nkey"), CredsFile: s.str("nats-creds"),
		TLSCert: s.str("nats-tls-cert"), TLSKey: s.str("nats-tls-key"), TLSCA: s.str("nats-tls-ca"),
		Name: name, Logger: slog.Default()})
	if err != nil {
		if c.embedded != nil {
			c.embedded.Shutdown()
		}
		return nil, err
	}
	c.nc = nc
	if c.js, err = jetstream.New(nc); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func streamConfig(s settings) worker.StreamConfig {
	return worker.StreamConfig{AckWait: s.v.GetDuration("ack-wait"), MaxDeliver: s.num("max-deliver")}
}
