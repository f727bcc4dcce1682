//go:build !unix

package model

import (
	"errors"
	"os"
)

// mapFile is not available on this platform: safetensors tensors are read into memory.
func mapFile(*os.File, int64) ([]byte, func([]byte) error, error) {
	return nil, nil, errors.New("model: memory mapping is not supported on this platform")
}
