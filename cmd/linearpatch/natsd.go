package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"

	"github.com/spf13/cobra"

	"linearpatch/worker"
)

func newNATSServerCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "nats-server --dir DIR [--listen HOST:PORT]",
		Short: "A standalone NATS server with JetStream, for runs that span machines",
		Long: `Run the embedded nats-server as its own process, storing JetStream data under --dir,
until interrupted. Point coordinator, teacher, cache and status at it with --nats. Restarted
on the same --dir and port it recovers every stream, bucket and consumer. For production
clusters, TLS and accounts, use a regular nats-server (configs in deploy/).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := resolve(cmd)
			if err != nil {
				return err
			}
			if s.str("dir") == "" {
				return errors.New("--dir is required")
			}
			host, portStr, err := net.SplitHostPort(s.str("listen"))
			if err != nil {
				return fmt.Errorf("--listen: %w", err)
			}
			port, err := strconv.Atoi(portStr)
			if err != nil {
				return fmt.Errorf("--listen port: %w", err)
			}
			opts := []worker.ServerOption{worker.WithListen(host, port), worker.WithServerLogger(slog.Default())}
			if mp := s.num("max-payload"); mp > 0 {
				opts = append(opts, worker.WithMaxPayload(mp))
			}
			srv, err := worker.StartEmbedded(cmd.Context(), s.str("dir"), opts...)
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), srv.URL())
			<-cmd.Context().Done()
			srv.Shutdown()
			return nil
		},
	}
	f := cmd.Flags()
	f.String("dir", "", "JetStream store directory (required)")
	f.String("listen", "127.0.0.1:4222", "listen address")
	f.Int("max-payload", 0, "max_payload in bytes (0: 1 MiB)")
	return cmd
}
