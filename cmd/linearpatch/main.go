// Command linearpatch revives layer-pruned LLaMA-family models with the LinearPatch method
// and runs its offline distillation as a distributed pipeline. Run `linearpatch help`.
//
// Every flag is also a config key: set it on the command line, as LINEARPATCH_<KEY> in the
// environment (dashes become underscores), or in the YAML file given by --config, in that
// order of precedence.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"github.com/spf13/viper"

	"linearpatch/model/tensor"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCmd().ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "linearpatch:", err)
		os.Exit(1)
	}
}

// settings are the values of one command's flags, resolved through viper (flag > env >
// config file > default).
type settings struct{ v *viper.Viper }

func (s settings) str(key string) string    { return s.v.GetString(key) }
func (s settings) num(key string) int       { return s.v.GetInt(key) }
func (s settings) float(key string) float64 { return s.v.GetFloat64(key) }
func (s settings) flag(key string) bool     { return s.v.GetBool(key) }
func (s settings) list(key string) []string { return s.v.GetStringSlice(key) }
func (s settings) uint64(key string) uint64 { return s.v.GetUint64(key) }

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "linearpatch",
		Short:         "Revive layer-pruned LLaMA-family models with a linear patch",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().String("config", "", "YAML config file whose keys are the flag names")
	root.PersistentFlags().Int("threads", 0, "compute threads (0: all cores)")
	root.PersistentFlags().String("log-level", "info", "log level: debug, info, warn, error")
	root.AddCommand(newEvalCmd(), newTokenizeCmd(), newSynthCmd(), newBenchCmd(), newPruneCmd(), newRunCmd(), newCoordinatorCmd(), newTeacherCmd(), newCacheCmd(), newStatusCmd(), newPurgeCmd(), newNATSServerCmd(), newStudentCmd(), newBenchStudentCmd(), newBenchStudentsCmd())
	root.AddCommand(newBenchDTypeCmd())
	return root
}

// computeCommands run the model's matmuls; they warn when OpenBLAS took slow kernels.
var computeCommands = map[string]bool{"eval": true, "prune": true, "run": true, "teacher": true, "student": true,
	"bench": true, "bench-student": true, "bench-students": true, "bench-dtype": true}

// resolve binds cmd's flags to a fresh viper instance, reads the config file and the
// environment, applies the global settings and returns the resolved values.
func resolve(cmd *cobra.Command) (settings, error) {
	v := viper.New()
	v.SetEnvPrefix("LINEARPATCH")
	v.SetEnvKeyReplacer(strings.NewReplacer("-", "_"))
	v.AutomaticEnv()
	var bindErr error
	cmd.Flags().VisitAll(func(f *pflag.Flag) {
		if err := v.BindPFlag(f.Name, f); err != nil && bindErr == nil {
			bindErr = err
		}
	})
	if bindErr != nil {
		return settings{}, bindErr
	}
	if file := v.GetString("config"); file != "" {
		v.SetConfigFile(file)
		v.SetConfigType("yaml")
		if err := v.ReadInConfig(); err != nil {
			return settings{}, fmt.Errorf("config %s: %w", file, err)
		}
		known := map[string]bool{}
		cmd.Flags().VisitAll(func(f *pflag.Flag) { known[f.Name] = true })
		for _, k := range v.AllKeys() {
			if !known[k] && !strings.Contains(k, ".") {
				slog.Warn("config key is not a flag of this command; ignored", "key", k, "command", cmd.Name())
			}
		}
	}
	s := settings{v}
	var level slog.Level
	if err := level.UnmarshalText([]byte(s.str("log-level"))); err != nil {
		return settings{}, fmt.Errorf("--log-level: %w", err)
	}
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})))
	if s.num("threads") < 0 {
		return settings{}, errors.New("--threads must be ≥ 0")
	}
	tensor.SetThreads(s.num("threads"))
	if computeCommands[cmd.Name()] {
		if a := tensor.BLASAdvice(); a != "" {
			slog.Warn(a)
		}
	}
	if err := checkExplicitZeros(cmd, s); err != nil {
		return settings{}, err
	}
	return s, nil
}
