package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"linearpatch/cache"
	"linearpatch/model"
	"linearpatch/protocol"
	"linearpatch/shards"
	"linearpatch/teacher"
	"linearpatch/worker"
)

func addWorkerFlags(cmd *cobra.Command) {
	f := cmd.Flags()
	f.String("run", "", "run id (printed by run and coordinator; default: the run.id file in --run-dir)")
	f.String("run-dir", "", "the run's directory (for a run with an embedded server: its nats.url)")
}

// joinRun connects a worker process to a run's NATS and waits until its bucket exists.
func joinRun(ctx context.Context, s settings, role worker.Role, name string) (*natsConn, worker.Names, error) {
	run := s.str("run")
	if run == "" && s.str("run-dir") != "" {
		b, err := os.ReadFile(filepath.Join(s.str("run-dir"), "run.id"))
		if err != nil {
			return nil, worker.Names{}, fmt.Errorf("--run not given and no run id in --run-dir: %w", err)
		}
		run = strings.TrimSpace(string(b))
	}
	if run == "" {
		return nil, worker.Names{}, errors.New("--run (or --run-dir) is required")
	}
	names, err := worker.NewNames(run)
	if err != nil {
		return nil, worker.Names{}, err
	}
	conn, err := connectNATS(ctx, s, s.str("run-dir"), nil, role, name)
	if err != nil {
		return nil, worker.Names{}, err
	}
	return conn, names, nil
}

// untilDone runs fn until the run reaches the done phase (checked in the KV bucket) or ctx ends.
func untilDone(ctx context.Context, js jetstream.JetStream, names worker.Names, fn func(ctx context.Context) error) error {
	g, gctx := errgroup.WithContext(ctx)
	runCtx, stop := context.WithCancel(gctx)
	defer stop()
	g.Go(func() error { return ignoreCanceled(fn(runCtx)) })
	g.Go(func() error {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-runCtx.Done():
				return nil
			case <-t.C:
				kv, err := js.KeyValue(runCtx, names.KVBucket())
				if err != nil {
					continue
				}
				if e, err := kv.Get(runCtx, protocol.KeyPhase); err == nil && protocol.Phase(e.Value()) == protocol.PhaseDone {
					slog.Info("the run is done; exiting")
					stop()
					return nil
				}
			}
		}
	})
	err := g.Wait()
	if errors.Is(err, context.Canceled) && ctx.Err() == nil {
		return nil
	}
	return err
}

func newTeacherCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "teacher --nats URL --run ID --model PATH",
		Short: "A teacher worker: compute shards of a run and publish their records",
		Long: `Pull shard tasks of run --run from NATS, run the original model (--model, the same
files as the coordinator's: the fingerprint is checked) and publish calibration statistics
and activation records. Start as many as you like, on any machine that reaches NATS; a
killed teacher's shard goes to another after --ack-wait. Exits when the run is done.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := resolve(cmd)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			path := s.str("model")
			if path == "" {
				return errors.New("--model is required")
			}
			fp, err := model.Fingerprint(path)
			if err != nil {
				return err
			}
			reg, stopMetrics, err := startMetrics(ctx, s)
			if err != nil {
				return err
			}
			defer stopMetrics()
			m, err := model.LoadContext(ctx, path)
			if err != nil {
				return err
			}
			conn, names, err := joinRun(ctx, s, worker.RoleTeacher, "linearpatch-teacher")
			if err != nil {
				return err
			}
			defer conn.Close()
			comp, err := teacher.NewCompute(m)
			if err != nil {
				return err
			}
			tw, err := teacher.NewWorker(teacher.Options{Name: s.str("name"), NC: conn.nc, JS: conn.js, Names: names,
				Compute: comp, Fingerprint: fp, Stream: streamConfig(s), WindowDelay: s.v.GetDuration("slow-window"),
				Metrics: reg.Teacher()})
			if err != nil {
				return err
			}
			return untilDone(ctx, conn.js, names, tw.Run)
		},
	}
	addWorkerFlags(cmd)
	addNATSFlags(cmd)
	addTaskFlags(cmd)
	cmd.Flags().String("model", "", "the original model (required)")
	cmd.Flags().String("name", "", "teacher name in status reports (default: host-pid)")
	addMetricsFlag(cmd)
	cmd.Flags().Duration("slow-window", 0, "sleep this long after each window (fault-injection tests)")
	_ = cmd.Flags().MarkHidden("slow-window")
	return cmd
}

func newCacheCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cache --nats URL --run ID --model PATH --dir DIR",
		Short: "The cache writer: assemble teacher records into verified shard files",
		Long: `Assemble the teachers' activation records of run --run into Arrow shard files in --dir,
listed with their checksums in --dir/manifest.json. A run has one cache writer: this one holds
the run's writer lease while it runs, and a second one exits with an error naming the first.
Restarted (same host and --dir) it resumes at once; started elsewhere after the holder died,
it takes over once the lease lapses (15 s) and rebuilds the shards its directory lacks from
the stream. Exits when the run is done.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := resolve(cmd)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			cfg, err := model.ReadModelConfig(s.str("model"))
			if err != nil {
				return err
			}
			dir := s.str("dir")
			if dir == "" {
				if s.str("run-dir") == "" {
					return errors.New("--dir (or --run-dir) is required")
				}
				dir = filepath.Join(s.str("run-dir"), "cache")
			}
			comp, err := shards.ParseCompression(s.str("compression"))
			if err != nil {
				return err
			}
			reg, stopMetrics, err := startMetrics(ctx, s)
			if err != nil {
				return err
			}
			defer stopMetrics()
			conn, names, err := joinRun(ctx, s, worker.RoleCache, "linearpatch-cache")
			if err != nil {
				return err
			}
			defer conn.Close()
			w, err := cache.NewWriter(cache.Options{JS: conn.js, Names: names, Dir: dir, Compression: comp, Dim: cfg.Dim, Vocab: cfg.Vocab,
				Metrics: reg.CacheWriter()})
			if err != nil {
				return err
			}
			return untilDone(ctx, conn.js, names, w.Run)
		},
	}
	addWorkerFlags(cmd)
	addNATSFlags(cmd)
	cmd.Flags().String("model", "", "the original model (its config gives the record shapes; required)")
	cmd.Flags().String("dir", "", "cache directory (default: RUN-DIR/cache)")
	cmd.Flags().String("compression", "zstd", "shard file compression: zstd, lz4 or none")
	addMetricsFlag(cmd)
	return cmd
}

func newStatusCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "status --run ID [--nats URL | --run-dir DIR]",
		Short: "Show a run's phase, shards done/leased/pending and tokens/s per teacher",
		Long: `Show a run's phase, its shards done, leased and pending (pending ones by id), the
cache writer and the teachers; a WARNING line when shards wait and every teacher is gone.
For a run whose embedded server has ended (a finished single-process run), --run-dir reads
what the run directory records instead. --json prints durations in seconds.`,
		Args: cobra.NoArgs,
		RunE: runStatus,
	}
	addWorkerFlags(cmd)
	addNATSFlags(cmd)
	cmd.Flags().Bool("json", false, "print the status as JSON")
	return cmd
}
