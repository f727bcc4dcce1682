package patch

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// Staged is an output directory written under a temporary name beside its destination:
// Commit renames it into place, Discard removes it. Writers stage every output of a
// command first and commit them together at the end, so a failure leaves none behind.
type Staged struct {
	tmp, dir string
}

// Dir returns the temporary directory the output is written into.
func (s *Staged) Dir() string { return s.tmp }

// Commit renames the staged directory to its destination, which must still not exist
// (ErrExists). On error the staged directory is removed.
func (s *Staged) Commit() error {
	if _, err := os.Lstat(s.dir); err == nil { // appeared meanwhile: do not replace it
		s.Discard()
		return fmt.Errorf("%w: %s", ErrExists, s.dir)
	}
	if err := os.Rename(s.tmp, s.dir); err != nil {
		s.Discard()
		return fmt.Errorf("patch: %w", err)
	}
	return nil
}

// Discard removes the staged directory (after a Commit it does nothing).
func (s *Staged) Discard() { os.RemoveAll(s.tmp) }

// stage creates the temporary sibling of dir (mode 0755), creating dir's parent if
// needed; dir must not exist (ErrExists).
func stage(dir string) (*Staged, error) {
	if _, err := os.Lstat(dir); err == nil {
		return nil, fmt.Errorf("%w: %s", ErrExists, dir)
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("patch: %w", err)
	}
	parent := filepath.Dir(filepath.Clean(dir))
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return nil, fmt.Errorf("patch: %w", err)
	}
	tmp, err := os.MkdirTemp(parent, "."+filepath.Base(dir)+".tmp-*")
	if err != nil {
		return nil, fmt.Errorf("patch: %w", err)
	}
	if err := os.Chmod(tmp, 0o755); err != nil { // MkdirTemp makes 0700
		os.RemoveAll(tmp)
		return nil, fmt.Errorf("patch: %w", err)
	}
	return &Staged{tmp: tmp, dir: dir}, nil
}

// CheckDest checks, before any work, that an output directory could be written at dir: it
// does not exist (ErrExists), and its nearest existing ancestor is a directory in which a
// directory can be created (tried and removed at once). It creates nothing that stays.
func CheckDest(dir string) error {
	if _, err := os.Lstat(dir); err == nil {
		return fmt.Errorf("%w: %s", ErrExists, dir)
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("patch: output %s: %w", dir, err)
	}
	anc := filepath.Dir(filepath.Clean(dir))
	for {
		st, err := os.Stat(anc)
		if err == nil {
			if !st.IsDir() {
				return fmt.Errorf("patch: output %s: %s is not a directory", dir, anc)
			}
			break
		}
		if !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("patch: output %s: %w", dir, err)
		}
		up := filepath.Dir(anc)
		if up == anc {
			return fmt.Errorf("patch: output %s: no existing ancestor", dir)
		}
		anc = up
	}
	probe, err := os.MkdirTemp(anc, ".linearpatch-probe-*")
	if err != nil {
		return fmt.Errorf("patch: output %s cannot be written: %w", dir, err)
	}
	return os.Remove(probe)
}
