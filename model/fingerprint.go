package model

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
)

// Fingerprint identifies a model's weights: the hex SHA-256 over config.json and every
// safetensors file of a Hugging Face directory (names and contents, in name order), or over
// a llama2.c checkpoint file. Two models share a fingerprint only if their bytes are equal.
func Fingerprint(path string) (string, error) {
	st, err := os.Stat(path)
	if err != nil {
		return "", fmt.Errorf("model: fingerprint: %w", err)
	}
	files := []string{path}
	if st.IsDir() {
		shards, err := filepath.Glob(filepath.Join(path, "*.safetensors"))
		if err != nil {
			return "", fmt.Errorf("model: fingerprint: %w", err)
		}
		sort.Strings(shards)
		files = append([]string{filepath.Join(path, "config.json")}, shards...)
	}
	h := sha256.New()
	for _, f := range files {
		fmt.Fprintf(h, "%s\x00", filepath.Base(f))
		if err := hashFile(h, f); err != nil {
			return "", err
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func hashFile(w io.Writer, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("model: fingerprint: %w", err)
	}
	defer f.Close()
	if _, err := io.Copy(w, f); err != nil {
		return fmt.Errorf("model: fingerprint %s: %w", path, err)
	}
	return nil
}
