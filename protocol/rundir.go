package protocol

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"linearpatch/internal/atomicfile"
)

// Files of the run directory that make it self-contained for the offline student.
const (
	PlanFile   = "plan.json"  // the Plan
	FitFile    = "fit.json"   // the FitResult
	Patch0File = "patch0.f32" // the training-free patch, d×d float32 little-endian (absent for none)
)

// WritePlan writes plan.json into the run directory.
func WritePlan(runDir string, p *Plan) error {
	b, err := json.MarshalIndent(p, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(runDir, PlanFile), b, 0o644)
}

// RunIDFile holds the run id in the run directory.
const RunIDFile = "run.id"

// ReadRunState reads the run id and the plan of a run directory. It returns (nil, nil) for
// a directory that holds no run (no run.id). The plan must be of this version (errors wrap
// ErrVersion) and belong to the run id; a run.id without its plan.json is an error.
func ReadRunState(runDir string) (*Plan, error) {
	b, err := os.ReadFile(filepath.Join(runDir, RunIDFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("protocol: run directory: %w", err)
	}
	id := strings.TrimSpace(string(b))
	pb, err := os.ReadFile(filepath.Join(runDir, PlanFile))
	if err != nil {
		return nil, fmt.Errorf("protocol: run directory %s holds run %s but no readable %s: %w (start a new run directory)", runDir, id, PlanFile, err)
	}
	var p Plan
	if err := json.Unmarshal(pb, &p); err != nil {
		return nil, fmt.Errorf("protocol: %s: %w", filepath.Join(runDir, PlanFile), err)
	}
	if p.RunID == "" {
		p.RunID = id
	}
	if err := p.CheckVersion(); err != nil {
		return nil, err
	}
	if p.RunID != id {
		return nil, fmt.Errorf("%w: %s names run %s but %s holds run %s", ErrPlan, RunIDFile, id, PlanFile, p.RunID)
	}
	return &p, nil
}

// WriteRunState writes plan.json and then run.id into the run directory, each atomically.
func WriteRunState(runDir string, p *Plan) error {
	if err := WritePlan(runDir, p); err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(runDir, RunIDFile), []byte(p.RunID), 0o644)
}

// WriteFit writes fit.json and, when P is non-nil, patch0.f32 into the run directory.
func WriteFit(runDir string, f FitResult, P []float32) error {
	if P != nil {
		if err := atomicfile.Write(filepath.Join(runDir, Patch0File), EncodeFloat32s(P), 0o644); err != nil {
			return err
		}
	}
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(runDir, FitFile), b, 0o644)
}

// ReadRunDir reads the plan, the fit and the training-free patch (nil for none) of a run
// directory, as the offline student needs them.
func ReadRunDir(runDir string) (*Plan, *FitResult, []float32, error) {
	var p Plan
	var f FitResult
	for _, x := range []struct {
		name string
		v    any
	}{{PlanFile, &p}, {FitFile, &f}} {
		b, err := os.ReadFile(filepath.Join(runDir, x.name))
		if err != nil {
			return nil, nil, nil, fmt.Errorf("protocol: run directory %s: %w (has its stats phase finished?)", runDir, err)
		}
		if err := json.Unmarshal(b, x.v); err != nil {
			return nil, nil, nil, fmt.Errorf("protocol: %s: %w", filepath.Join(runDir, x.name), err)
		}
	}
	if err := p.CheckVersion(); err != nil {
		return nil, nil, nil, err
	}
	if !f.HasP {
		return &p, &f, nil, nil
	}
	b, err := os.ReadFile(filepath.Join(runDir, Patch0File))
	if err != nil {
		return nil, nil, nil, fmt.Errorf("protocol: %w", err)
	}
	P, err := DecodeFloat32s(b)
	if err != nil {
		return nil, nil, nil, err
	}
	return &p, &f, P, nil
}
