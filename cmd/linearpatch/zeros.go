package main

import (
	"fmt"
	"strconv"
	"time"

	"github.com/spf13/cobra"
)

// zeroMeaningless are the flags whose zero makes no sense. Their defaults are not zero, so
// a zero was given (flag, environment or config file) and is refused rather than replaced
// by a default downstream, where a zero means "unset".
var zeroMeaningless = []string{"lr", "epochs", "batch", "lease", "ack-wait", "max-deliver"}

// checkExplicitZeros refuses a zero for those of zeroMeaningless that cmd has.
func checkExplicitZeros(cmd *cobra.Command, s settings) error {
	for _, name := range zeroMeaningless {
		f := cmd.Flags().Lookup(name)
		if f == nil || isZero(f.DefValue) {
			continue // a flag whose default is zero gives zero a meaning of its own
		}
		if isZero(s.str(name)) {
			return fmt.Errorf("--%s 0: must be positive", name)
		}
	}
	return nil
}

// isZero reports whether v reads as zero, as a number or a duration ("0", "0.0", "0s").
func isZero(v string) bool {
	if d, err := time.ParseDuration(v); err == nil {
		return d == 0
	}
	f, err := strconv.ParseFloat(v, 64)
	return err == nil && f == 0
}
