package protocol

import (
	"strings"
	"testing"

	"linearpatch/worker"
)

// TestStudentNamesAgree: the student's role permissions (worker) name the keys and objects
// the student protocol (package protocol) writes.
func TestStudentNamesAgree(t *testing.T) {
	for _, c := range [][2]string{
		{worker.StudentCheckpointObject, ObjStudentCheckpoint},
		{worker.StudentPatchObject, ObjPatchKD},
		{worker.StudentStatusKey, KeyStudent},
		{worker.StudentResultKey, KeyStudentResult},
		{strings.Join(worker.CoordinatorObjects, ","), strings.Join([]string{ObjCalibTokens, ObjTrainTokens, ObjPatch0}, ",")},
	} {
		if c[0] != c[1] {
			t.Errorf("worker's %q != protocol's %q", c[0], c[1])
		}
	}
}
