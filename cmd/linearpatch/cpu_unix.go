//go:build unix

package main

import (
	"syscall"
	"time"
)

// cpuSeconds returns the process's user + system CPU time so far (0 where unavailable).
func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}
