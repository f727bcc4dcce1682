package main

import (
	"context"
	"log/slog"

	"github.com/spf13/cobra"

	"linearpatch/metrics"
)

// addMetricsFlag declares --metrics-listen on a long-running worker command.
func addMetricsFlag(cmd *cobra.Command) {
	cmd.Flags().String("metrics-listen", "", "serve Prometheus metrics at http://ADDR/metrics, e.g. 0.0.0.0:9464 (empty: none)")
}

// startMetrics serves the process's metrics on --metrics-listen until ctx ends. Without the
// flag it returns a nil registry (whose worker metrics record nothing) and a no-op stop.
func startMetrics(ctx context.Context, s settings) (*metrics.Registry, func(), error) {
	addr := s.str("metrics-listen")
	if addr == "" {
		return nil, func() {}, nil
	}
	reg := metrics.New()
	srv, err := reg.Serve(ctx, addr, slog.Default())
	if err != nil {
		return nil, nil, err
	}
	return reg, func() { _ = srv.Close() }, nil
}
