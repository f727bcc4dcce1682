package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"linearpatch/coordinator"
	"linearpatch/protocol"
	"linearpatch/worker"
)

// purgeStale is how long the status of a run that is not done must be silent before
// purge --force takes the run for abandoned (its coordinator publishes every 2 s).
const purgeStale = time.Minute

func newPurgeCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "purge --run ID [--nats URL | --run-dir DIR] [--dry-run]",
		Short: "List a finished run's streams, buckets and object store with their sizes, and remove them",
		Long: `A run keeps its task, data and dead-letter streams, its key-value bucket and its object
store on the NATS server after it finished (the data stream holds every activation record:
about 85 GB for the paper's cache). purge lists them with their sizes and removes them.
It refuses a run that is not done; --force removes one whose coordinator has not published
a status for a minute (an abandoned run). --dry-run only lists.`,
		Args: cobra.NoArgs,
		RunE: runPurge,
	}
	addWorkerFlags(cmd)
	addNATSFlags(cmd)
	cmd.Flags().Bool("dry-run", false, "list what would be removed, remove nothing")
	cmd.Flags().Bool("force", false, "also purge a run that is not done once its status is a minute old")
	cmd.Flags().Bool("json", false, "print the list as JSON")
	return cmd
}

// purgeItem is one store of a run.
type purgeItem struct {
	Name     string `json:"name"`
	Kind     string `json:"kind"` // stream, kv or object-store
	Stream   string `json:"stream"`
	Present  bool   `json:"present"`
	Bytes    uint64 `json:"bytes"`
	Messages uint64 `json:"messages"`
	Removed  bool   `json:"removed"`
}

// runStores lists the JetStream stores of a run, in the order purge removes them (the
// bucket, which says whether the run is done, last).
func runStores(names worker.Names) []purgeItem {
	return []purgeItem{
		{Name: names.TasksStream(), Kind: "stream", Stream: names.TasksStream()},
		{Name: names.DataStream(), Kind: "stream", Stream: names.DataStream()},
		{Name: names.DeadStream(), Kind: "stream", Stream: names.DeadStream()},
		{Name: names.ObjectStore(), Kind: "object-store", Stream: "OBJ_" + names.ObjectStore()},
		{Name: names.GradStore(), Kind: "object-store", Stream: "OBJ_" + names.GradStore()},
		{Name: names.KVBucket(), Kind: "kv", Stream: "KV_" + names.KVBucket()},
	}
}

// checkPurgeable refuses a run that is still going: not done, and (unless force) at all;
// with force, one whose status was updated within purgeStale.
func checkPurgeable(ctx context.Context, js jetstream.JetStream, names worker.Names, force bool, now time.Time) error {
	kv, err := js.KeyValue(ctx, names.KVBucket())
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return nil // nothing says the run goes on: what is left is removed
	}
	if err != nil {
		return fmt.Errorf("run %s: %w", names.Run(), err)
	}
	phase := protocol.Phase("")
	if e, err := kv.Get(ctx, protocol.KeyPhase); err == nil {
		phase = protocol.Phase(e.Value())
	}
	if phase == protocol.PhaseDone {
		return nil
	}
	var st coordinator.Status
	age := time.Duration(-1)
	if e, err := kv.Get(ctx, coordinator.KeyStatus); err == nil && json.Unmarshal(e.Value(), &st) == nil {
		age = now.Sub(st.Updated)
	}
	if force && (age < 0 || age > purgeStale) {
		return nil
	}
	what := "no status yet"
	if age >= 0 {
		what = fmt.Sprintf("status updated %s ago", age.Round(time.Second))
	}
	if phase == "" {
		phase = "not started"
	}
	hint := "purge removes finished runs"
	if !force {
		hint += "; --force removes an abandoned one once its status is a minute old"
	}
	return fmt.Errorf("run %s is still going (phase %s, %s): %s", names.Run(), phase, what, hint)
}

func runPurge(cmd *cobra.Command, _ []string) error {
	s, err := resolve(cmd)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), time.Minute)
	defer cancel()
	conn, names, err := joinRun(ctx, s, worker.RoleCoordinator, "linearpatch-purge")
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := checkPurgeable(ctx, conn.js, names, s.flag("force"), time.Now()); err != nil {
		return err
	}
	items := runStores(names)
	var total uint64
	for i := range items {
		info, err := conn.js.Stream(ctx, items[i].Stream)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			continue
		}
		if err != nil {
			return fmt.Errorf("stream %s: %w", items[i].Stream, err)
		}
		st := info.CachedInfo().State
		items[i].Present, items[i].Bytes, items[i].Messages = true, st.Bytes, st.Msgs
		total += st.Bytes
	}
	if !s.flag("dry-run") {
		for i := range items {
			if !items[i].Present {
				continue
			}
			var err error
			switch items[i].Kind {
			case "kv":
				err = conn.js.DeleteKeyValue(ctx, items[i].Name)
			case "object-store":
				err = conn.js.DeleteObjectStore(ctx, items[i].Name)
			default:
				err = conn.js.DeleteStream(ctx, items[i].Stream)
			}
			if err != nil {
				return fmt.Errorf("removing %s %s: %w", items[i].Kind, items[i].Name, err)
			}
			items[i].Removed = true
		}
	}
	w := cmd.OutOrStdout()
	if s.flag("json") {
		return json.NewEncoder(w).Encode(struct {
			Run    string      `json:"run"`
			Bytes  uint64      `json:"bytes"`
			DryRun bool        `json:"dry_run"`
			Stores []purgeItem `json:"stores"`
		}{names.Run(), total, s.flag("dry-run"), items})
	}
	fmt.Fprintf(w, "run %s on the NATS server:\n\n| store | kind | messages | size | |\n|---|---|---:|---:|---|\n", names.Run())
	for _, it := range items {
		state := "absent"
		switch {
		case it.Removed:
			state = "removed"
		case it.Present:
			state = "kept (--dry-run)"
		}
		fmt.Fprintf(w, "| %s | %s | %d | %.1f MiB | %s |\n", it.Name, it.Kind, it.Messages, float64(it.Bytes)/(1<<20), state)
	}
	verb := "removed"
	if s.flag("dry-run") {
		verb = "would be removed"
	}
	fmt.Fprintf(w, "\n%.1f MiB %s\n", float64(total)/(1<<20), verb)
	return nil
}
