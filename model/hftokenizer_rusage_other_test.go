//go:build !linux

package model

import "syscall"

const rusageThread = syscall.RUSAGE_SELF
