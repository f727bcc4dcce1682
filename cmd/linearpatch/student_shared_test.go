package main

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"linearpatch/student"
	"linearpatch/worker"
)

// TestRunStudentsBitIdentical: `run --students 2 --batch 2` (two in-process students
// sharing every step through the embedded server) exports the patch of `run --students 1
// --batch 2` bit for bit.
func TestRunStudentsBitIdentical(t *testing.T) {
	fx := newPipelineFixture(t)
	train := []string{"--epochs", "3", "--batch", "2", "--checkpoint-every", "3", "--lr", "1e-3", "--threads", "1"}
	run := func(name, students string) []float32 {
		dir := filepath.Join(fx.dir, name)
		if _, err := runCLI(t, append(append(append([]string{"run", "--students", students}, fx.settingsArgs()...), train...),
			"--out", filepath.Join(dir, "out"), "--run-dir", filepath.Join(dir, "run"), "--teachers", "1")...); err != nil {
			t.Fatal(err)
		}
		return readPatch(t, filepath.Join(dir, "out"))
	}
	want := run("one", "1")
	got := run("two", "2")
	if _, err := os.Stat(filepath.Join(fx.dir, "two", "run", "student", "student-1", "kd_curve.png")); err != nil {
		t.Fatalf("the second student's curve: %v", err)
	}
	if len(got) != len(want) {
		t.Fatalf("%d values, want %d", len(got), len(want))
	}
	for i := range want {
		if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
			t.Fatalf("element %d: %v with 2 students, %v with 1", i, got[i], want[i])
		}
	}
}

// TestRunStudentsRefused: more students than windows per step, or none, are refused
// before any work.
func TestRunStudentsRefused(t *testing.T) {
	fx := newPipelineFixture(t)
	for _, c := range []struct{ students, batch, want string }{
		{"3", "2", "--students 3 with --batch 2"},
		{"2", "1", "--students 2 with --batch 1"},
		{"0", "1", "--students 0: must be at least 1"},
	} {
		dir := filepath.Join(fx.dir, "refused"+c.students+c.batch)
		_, err := runCLI(t, append(append([]string{"run", "--students", c.students, "--batch", c.batch}, fx.settingsArgs()...),
			"--out", filepath.Join(dir, "out"), "--run-dir", filepath.Join(dir, "run"))...)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Fatalf("--students %s --batch %s: %v, want %q", c.students, c.batch, err, c.want)
		}
		if _, err := os.Stat(dir); err == nil {
			t.Fatalf("--students %s --batch %s: %s was created", c.students, c.batch, dir)
		}
	}
}

// TestSharedStudentIdles: a student joining a run whose live students already cover its
// --batch says it will idle; status's table counts the live students.
func TestSharedStudentIdles(t *testing.T) {
	ctx := t.Context()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	srv, err := worker.StartEmbedded(ctx, t.TempDir(), worker.WithAllowAnonymous(), worker.WithServerLogger(quiet))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Shutdown)
	nc, err := worker.Connect(ctx, worker.ConnOptions{URL: srv.URL()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, _ := jetstream.New(nc)
	names, _ := worker.NewNames("ridle")
	if err := worker.Setup(ctx, js, names, worker.StreamConfig{}); err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(ctx, names.KVBucket())
	if err != nil {
		t.Fatal(err)
	}
	cfg := student.TrainConfig{Batch: 2}
	var logs []*bytes.Buffer
	for i := range 3 {
		var b bytes.Buffer
		logs = append(logs, &b)
		sh, err := startShared(ctx, js, kv, names, cfg, time.Minute, fmt.Sprint("h", i), slog.New(slog.NewTextHandler(&b, nil)))
		if err != nil {
			t.Fatal(err)
		}
		defer sh.stop()
	}
	for i, b := range logs {
		if idle := strings.Contains(b.String(), "will idle"); idle != (i == 2) {
			t.Errorf("student %d: idle message %v:\n%s", i, idle, b)
		}
	}
	var out bytes.Buffer
	printStudents(&out, readStudents(ctx, kv, time.Now()))
	if !strings.Contains(out.String(), "students: 3 live of 3 reported") {
		t.Fatalf("status:\n%s", &out)
	}
}
