//go:build unix

package model

import (
	"fmt"
	"math"
	"os"
	"syscall"
)

// mapFile maps size bytes of f read-only and shared; unmap releases the mapping.
func mapFile(f *os.File, size int64) (data []byte, unmap func([]byte) error, err error) {
	if size <= 0 || size > math.MaxInt {
		return nil, nil, fmt.Errorf("model: cannot map %d bytes", size)
	}
	data, err = syscall.Mmap(int(f.Fd()), 0, int(size), syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		return nil, nil, fmt.Errorf("model: mmap %s: %w", f.Name(), err)
	}
	return data, syscall.Munmap, nil
}
