package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"linearpatch/worker"
)

func newNATSServerCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "nats-server --nats-config FILE [--dir DIR] [--listen HOST:PORT]",
		Short: "A standalone NATS server with JetStream, for runs that span machines",
		Long: `Run the embedded nats-server as its own process, storing JetStream data under --dir,
until interrupted. Point coordinator, teacher, cache and status at it with --nats. Restarted
on the same --dir and port it recovers every stream, bucket and consumer.

It starts only with an authorization configuration (--nats-config, a nats-server config file such
as deploy/nats/auth.conf, which several cluster nodes can share: one user per linearpatch
role) or with --allow-anonymous, which lets anyone who reaches the port read, write or delete
every run on it. Listening beyond loopback needs TLS (--tls-cert/--tls-key, or a tls block in
--nats-config) unless --insecure-plaintext allows it. --dir, --listen and --max-payload
override the config file when given. (--config is, as for every command, a YAML file of
these flags.)`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := resolve(cmd)
			if err != nil {
				return err
			}
			conf := s.str("nats-config")
			if conf == "" && !s.flag("allow-anonymous") {
				return errors.New("nats-server: give an authorization configuration with --nats-config FILE (see deploy/nats/auth.conf), or --allow-anonymous to run a server anyone can use (unsafe)")
			}
			if conf == "" && s.str("dir") == "" {
				return errors.New("--dir is required")
			}
			opts := []worker.ServerOption{worker.WithServerLogger(slog.Default())}
			if conf != "" {
				opts = append(opts, worker.WithConfigFile(conf))
			}
			if conf == "" || cmd.Flags().Changed("listen") {
				host, portStr, err := net.SplitHostPort(s.str("listen"))
				if err != nil {
					return fmt.Errorf("--listen: %w", err)
				}
				port, err := strconv.Atoi(portStr)
				if err != nil {
					return fmt.Errorf("--listen port: %w", err)
				}
				opts = append(opts, worker.WithListen(host, port))
			}
			if mp := s.num("max-payload"); mp > 0 {
				opts = append(opts, worker.WithMaxPayload(mp))
			}
			if cert, key := s.str("tls-cert"), s.str("tls-key"); cert != "" || key != "" {
				opts = append(opts, worker.WithTLS(cert, key))
			}
			if s.flag("allow-anonymous") {
				opts = append(opts, worker.WithAllowAnonymous())
			}
			if s.flag("insecure-plaintext") {
				opts = append(opts, worker.WithInsecurePlaintext())
			}
			copts, err := clusterServerOptions(s)
			if err != nil {
				return err
			}
			opts = append(opts, copts...)
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
	f.String("nats-config", "", "nats-server configuration file with an authorization section (e.g. deploy/nats/auth.conf)")
	f.String("dir", "", "JetStream store directory (required unless --nats-config sets store_dir)")
	f.String("listen", "127.0.0.1:4222", "listen address")
	f.Int("max-payload", 0, "max_payload in bytes (0: 1 MiB, or the config file's)")
	f.String("tls-cert", "", "serve TLS with this certificate (PEM)")
	f.String("tls-key", "", "key of --tls-cert (PEM)")
	f.Bool("allow-anonymous", false, "UNSAFE: start without authorization; anyone who reaches the port can read, poison or delete every run")
	f.Bool("insecure-plaintext", false, "INSECURE: listen beyond loopback without TLS (clients, and cluster routes, which have no TLS here)")
	addClusterFlags(cmd)
	return cmd
}

// addClusterFlags declares nats-server's cluster settings: a JetStream cluster of three
// (or five) nodes keeps a run going when a node dies, with streams and buckets created
// with --replicas 3 by the coordinator.
func addClusterFlags(cmd *cobra.Command) {
	f := cmd.Flags()
	f.String("server-name", "", "server name, unique in a cluster (default: linearpatch; required with --cluster-name)")
	f.String("cluster-name", "", "join the JetStream cluster of this name (with --cluster-listen and --routes)")
	f.String("cluster-listen", "", "address for routes from the other nodes, HOST:PORT (required with --cluster-name)")
	f.String("routes", "", "comma-separated routes to the other nodes, nats-route://HOST:PORT (this node's own may be listed)")
}

// clusterServerOptions turns the cluster flags into server options (none without
// --cluster-name; the other cluster flags then are an error rather than ignored).
func clusterServerOptions(s settings) ([]worker.ServerOption, error) {
	var opts []worker.ServerOption
	if name := s.str("server-name"); name != "" {
		opts = append(opts, worker.WithServerName(name))
	}
	cluster := s.str("cluster-name")
	if cluster == "" {
		if s.str("cluster-listen") != "" || s.str("routes") != "" {
			return nil, errors.New("--cluster-listen and --routes need --cluster-name")
		}
		return opts, nil
	}
	if s.str("server-name") == "" {
		return nil, errors.New("--cluster-name needs --server-name, unique among the cluster's nodes")
	}
	if s.str("cluster-listen") == "" {
		return nil, errors.New("--cluster-name needs --cluster-listen HOST:PORT")
	}
	host, portStr, err := net.SplitHostPort(s.str("cluster-listen"))
	if err != nil {
		return nil, fmt.Errorf("--cluster-listen: %w", err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return nil, fmt.Errorf("--cluster-listen port: %w", err)
	}
	var routes []string
	if r := s.str("routes"); r != "" {
		routes = strings.Split(r, ",")
	}
	return append(opts, worker.WithCluster(cluster, host, port, routes)), nil
}
