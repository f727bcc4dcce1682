package patch

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"linearpatch/model"
	"linearpatch/model/tensor"
)

var reportOut = flag.String("report-out", "", "also write TestReportWrite's report to this directory (must not exist), to look at")

// profileByHand computes the channel, rotated and first-window token profiles of the rows of
// x (all windows stacked, T tokens each) directly, in float64.
func profileByHand(x *tensor.Matrix, h *Hadamard, T int) (chn, rot, tok []float64) {
	d := x.Cols
	chn, rot, tok = make([]float64, d), make([]float64, d), make([]float64, T)
	buf := make([]float64, d)
	for r := range x.Rows {
		for c, v := range x.Row(r) {
			chn[c] += math.Abs(float64(v))
			buf[c] = float64(v)
			if r < T {
				tok[r] += math.Abs(float64(v)) / float64(d)
			}
		}
		h.Rotate(buf)
		for c, v := range buf {
			rot[c] += math.Abs(v)
		}
	}
	for c := range chn {
		chn[c] /= float64(x.Rows)
		rot[c] /= float64(x.Rows)
	}
	return chn, rot, tok
}

func maxRelDiff(t *testing.T, what string, got, want []float64) float64 {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: len %d, want %d", what, len(got), len(want))
	}
	worst := 0.0
	for i := range got {
		worst = math.Max(worst, math.Abs(got[i]-want[i])/math.Max(math.Abs(want[i]), 1e-12))
	}
	return worst
}

func scaled(v []float64, s float64) []float64 {
	out := make([]float64, len(v))
	for i, x := range v {
		out[i] = s * x
	}
	return out
}

func TestReportProfileCut(t *testing.T) {
	m, h := tinyModel(t)
	d := m.Dim
	rng := rand.New(rand.NewPCG(3, 4))
	// T = 600 makes three windows per forward: five windows take two batches.
	const T, start, end = 600, 1, 3
	windows := randomWindows(rng, 5, T, m.Vocab)
	ctx := context.Background()

	identity := tensor.New(d, d)
	twice := tensor.New(d, d)
	for c := range d {
		identity.Data[c*d+c] = 1
		twice.Data[c*d+c] = 2
	}
	base, err := ProfileCut(ctx, m, h, windows, start, end, nil)
	if err != nil {
		t.Fatal(err)
	}
	if base.Start != start || base.End != end {
		t.Fatalf("profile of [%d, %d), want [%d, %d)", base.Start, base.End, start, end)
	}

	t.Run("independent", func(t *testing.T) {
		hs := m.HiddenStates(windows, []int{start, end})
		for _, c := range []struct {
			name          string
			x             *tensor.Matrix
			chn, rot, tok []float64
		}{
			{"target", hs[end], base.ChanTarget, base.RotTarget, base.TokTarget},
			{"source", hs[start], base.ChanSource, base.RotSource, base.TokSource},
		} {
			chn, rot, tok := profileByHand(c.x, h, T)
			for _, v := range []struct {
				what      string
				got, want []float64
			}{{"channels", c.chn, chn}, {"rotated", c.rot, rot}, {"tokens", c.tok, tok}} {
				if e := maxRelDiff(t, c.name+" "+v.what, v.got, v.want); e > 1e-5 {
					t.Errorf("%s %s: max relative difference %g from HiddenStates", c.name, v.what, e)
				}
			}
		}
	})

	t.Run("nil patch is the source", func(t *testing.T) {
		for _, pair := range [][2][]float64{{base.ChanPatched, base.ChanSource}, {base.RotPatched, base.RotSource}, {base.TokPatched, base.TokSource}} {
			if !equalExact(pair[0], pair[1]) {
				t.Fatal("patched differs from source without a patch")
			}
		}
	})

	t.Run("identity", func(t *testing.T) {
		p, err := ProfileCut(ctx, m, h, windows, start, end, identity)
		if err != nil {
			t.Fatal(err)
		}
		if !equalExact(p.ChanPatched, p.ChanSource) || !equalExact(p.RotPatched, p.RotSource) || !equalExact(p.TokPatched, p.TokSource) {
			t.Fatal("P = I: patched differs from source")
		}
		if !equalExact(p.ChanTarget, base.ChanTarget) || !equalExact(p.ChanSource, base.ChanSource) {
			t.Fatal("P changed the target or source profile")
		}
	})

	t.Run("twice", func(t *testing.T) {
		p, err := ProfileCut(ctx, m, h, windows, start, end, twice)
		if err != nil {
			t.Fatal(err)
		}
		if !equalExact(p.ChanPatched, scaled(p.ChanSource, 2)) || !equalExact(p.TokPatched, scaled(p.TokSource, 2)) {
			t.Fatal("P = 2I: plain patched profile is not twice the source")
		}
		if e := maxRelDiff(t, "rotated", p.RotPatched, scaled(p.RotSource, 2)); e > 1e-12 {
			t.Fatalf("P = 2I: rotated patched profile off by %g relative", e)
		}
	})

	t.Run("diag fitted on the profile matches the target", func(t *testing.T) {
		// P = diag(target/source) scales each channel's mean |·| to the target exactly
		// (up to float32 rounding): a patch that must close the plain-space gap.
		P := tensor.New(d, d)
		for c := range d {
			P.Data[c*d+c] = float32(base.ChanTarget[c] / base.ChanSource[c])
		}
		p, err := ProfileCut(ctx, m, nil, windows, start, end, P)
		if err != nil {
			t.Fatal(err)
		}
		if p.RotTarget != nil || p.RotSource != nil || p.RotPatched != nil {
			t.Fatal("rotated profile without a Hadamard")
		}
		if e := maxRelDiff(t, "patched", p.ChanPatched, p.ChanTarget); e > 1e-5 {
			t.Fatalf("diag patch: patched channels off the target by %g relative", e)
		}
		before, _ := meanAbsLogRatio(p.ChanTarget, p.ChanSource)
		if before < 1e-3 {
			t.Fatalf("source already matches the target (mean |log ratio| %g): the test cannot tell", before)
		}
	})

	t.Run("random patch", func(t *testing.T) {
		P := tensor.New(d, d)
		for k := range P.Data {
			P.Data[k] = float32(rng.NormFloat64() / math.Sqrt(float64(d)))
		}
		p, err := ProfileCut(ctx, m, h, windows[:2], start, end, P)
		if err != nil {
			t.Fatal(err)
		}
		src := m.HiddenStates(windows[:2], []int{start})[start]
		xp := tensor.New(src.Rows, d)
		for r := range src.Rows { // naive x·P in float64
			for b := range d {
				var s float64
				for a := range d {
					s += float64(src.Data[r*d+a]) * float64(P.Data[a*d+b])
				}
				xp.Data[r*d+b] = float32(s)
			}
		}
		chn, rot, tok := profileByHand(xp, h, T)
		for _, v := range []struct {
			what      string
			got, want []float64
		}{{"channels", p.ChanPatched, chn}, {"rotated", p.RotPatched, rot}, {"tokens", p.TokPatched, tok}} {
			if e := maxRelDiff(t, v.what, v.got, v.want); e > 1e-4 {
				t.Errorf("patched %s: max relative difference %g from the naive product", v.what, e)
			}
		}
	})
}

func equalExact(a, b []float64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestReportProfileCutErrors(t *testing.T) {
	m, h := tinyModel(t)
	rng := rand.New(rand.NewPCG(5, 6))
	w := randomWindows(rng, 2, 8, m.Vocab)
	h16, err := NewHadamard(16)
	if err != nil {
		t.Fatal(err)
	}
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	patched := m.Pruned(1, 2, nil)
	patched.Patch = &model.Patch{Before: 1, P: tensor.New(m.Dim, m.Dim)}
	for _, c := range []struct {
		name       string
		ctx        context.Context
		m          *model.Model
		h          *Hadamard
		windows    [][]int
		start, end int
		P          *tensor.Matrix
		want       error
	}{
		{"block outside", context.Background(), m, h, w, 2, 5, nil, model.ErrConfig},
		{"empty block", context.Background(), m, h, w, 2, 2, nil, model.ErrConfig},
		{"no windows", context.Background(), m, h, nil, 1, 2, nil, ErrProfile},
		{"ragged", context.Background(), m, h, [][]int{w[0], w[1][:5]}, 1, 2, nil, ErrProfile},
		{"id outside vocab", context.Background(), m, h, [][]int{{1, 2, m.Vocab}}, 1, 2, nil, ErrProfile},
		{"negative id", context.Background(), m, h, [][]int{{1, -1, 3}}, 1, 2, nil, ErrProfile},
		{"hadamard order", context.Background(), m, h16, w, 1, 2, nil, ErrProfile},
		{"patch shape", context.Background(), m, h, w, 1, 2, tensor.New(m.Dim, m.Dim-1), ErrProfile},
		{"patched model", context.Background(), patched, h, w, 1, 2, nil, ErrProfile},
		{"canceled", canceled, m, h, w, 1, 2, nil, context.Canceled},
	} {
		t.Run(c.name, func(t *testing.T) {
			p, err := ProfileCut(c.ctx, c.m, c.h, c.windows, c.start, c.end, c.P)
			if !errors.Is(err, c.want) || p != nil {
				t.Fatalf("got %v, %v; want an error wrapping %v", p, err, c.want)
			}
		})
	}
}

// reportInput builds a full report input from a profile of the tiny model.
func reportInput(t *testing.T) ReportInput {
	t.Helper()
	m, h := tinyModel(t)
	rng := rand.New(rand.NewPCG(7, 8))
	windows := randomWindows(rng, 4, 64, m.Vocab)
	const n, start = 2, 1
	P := tensor.New(m.Dim, m.Dim)
	for c := range m.Dim {
		P.Data[c*m.Dim+c] = 1.5
	}
	prof, err := ProfileCut(context.Background(), m, h, windows, start, start+n, P)
	if err != nil {
		t.Fatal(err)
	}
	prof.TokTarget[0] *= 40 // an outlier token, as real models have at position 0
	return ReportInput{
		Model: "synthetic/tiny`x", NumPrune: n, Start: start, End: start + n, Method: string(MethodRotate),
		Cosine: []float64{0.97, 0.91, 0.83}, // start 0 is the best but an edge
		Scores: map[string]Score{
			"dense":  {PPL: 10, NLL: math.Log(10), Top1: 1},
			"none":   {PPL: 20, NLL: math.Log(20), KL: 0.7, Top1: 0.6},
			"rotate": {PPL: 12, NLL: math.Log(12), KL: 0.2, Top1: 0.8},
			"diag":   {PPL: 14, NLL: math.Log(14), KL: 0.3, Top1: 0.75},
		},
		Profile: prof,
		Extra:   []string{"- Calibration took 1.5 s (extra line)."},
	}
}

var pngMagic = []byte("\x89PNG\r\n\x1a\n")

func TestReportWrite(t *testing.T) {
	base := reportInput(t)
	noRot := base
	prof := *base.Profile
	prof.RotTarget, prof.RotSource, prof.RotPatched = nil, nil, nil
	noRot.Profile = &prof
	noProfile := base
	noProfile.Profile, noProfile.Scores, noProfile.AllowEdges = nil, nil, true
	tasks := map[string]model.TasksResult{
		"dense":  model.NewTasksResult([]model.TaskResult{{Task: "mc", Acc: 0.8, AccNorm: 0.5}, {Task: "arc", Acc: 0.5, AccNorm: 0.5}}),
		"none":   model.NewTasksResult([]model.TaskResult{{Task: "mc", Acc: 0.4, AccNorm: 0.25}, {Task: "arc", Acc: 0.5, AccNorm: 0.25}}),
		"rotate": model.NewTasksResult([]model.TaskResult{{Task: "mc", Acc: 0.72, AccNorm: 0.5}, {Task: "arc", Acc: 0.45, AccNorm: 0.4}}),
	}
	withTasks := base
	withTasks.Tasks, withTasks.Protocol = tasks, "join"
	tasksOnly := noProfile
	tasksOnly.Tasks = tasks

	all := []string{reportCosinePNG, reportChannelsPNG, reportChanRotPNG, reportTokensPNG}
	for _, c := range []struct {
		name    string
		in      ReportInput
		want    []string
		missing []string
		text    []string
		notText []string
	}{
		{"full", base, all, nil, []string{
			"layers 1..2", "`[1, 3)`", "**rotate**", "synthetic/tiny'x",
			"| **1** | **1..2** | **0.91000** | **selected** |", "| 0 | 0..1 | 0.97000 | excluded (edge) |",
			"| method | perplexity | Δ vs dense | KL | top-1 |", "| **rotate** (exported) | 12.000 | +2.000 (+20.0%)",
			"rotate closes 80.0% of that gap", "is at start 0 but is an excluded edge block",
			"(cosine.png)", "(channels.png)", "(channels_rotated.png)", "(tokens.png)",
			"mean |log(target/·)| per channel falls from", "after the patch (factor",
			"outlier tokens in the target", "position 0 (", "- Calibration took 1.5 s (extra line).",
		}, nil},
		{"tasks", withTasks, all, nil, []string{
			"(join protocol)", "| method | perplexity | Δ vs dense | KL | top-1 | mc acc / acc_norm | arc acc / acc_norm | retained acc | retained acc_norm |",
			"| **rotate** (exported) | 12.000 | +2.000 (+20.0%) | 0.2000 | 80.0% | 72.0% / 50.0% | 45.0% / 40.0% | 90.00% | 90.00% |",
			"| none | 20.000 | +10.000 (+100.0%) | 0.7000 | 60.0% | 40.0% / 25.0% | 50.0% / 25.0% | 75.00% | 50.00% |",
			"| diag | 14.000 | +4.000 (+40.0%) | 0.3000 | 75.0% | — | — | — | — |",
		}, nil},
		{"tasks only", tasksOnly, []string{reportCosinePNG}, all[1:], []string{
			"| method | mc acc / acc_norm | arc acc / acc_norm | retained acc | retained acc_norm |",
			"| dense | 80.0% / 50.0% | 50.0% / 50.0% | 100.00% | 100.00% |",
		}, []string{"perplexity |"}},
		{"no rotation", noRot, []string{reportCosinePNG, reportChannelsPNG, reportTokensPNG}, []string{reportChanRotPNG},
			[]string{"(channels.png)"}, []string{"channels_rotated.png"}},
		{"no profile, no scores", noProfile, []string{reportCosinePNG}, all[1:],
			[]string{"| **1** | **1..2** |", "(cosine.png)", "edges allowed"},
			[]string{"| method |", "channels.png", "tokens.png", "excluded (edge)"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "report")
			if err := WriteReport(dir, c.in); err != nil {
				t.Fatal(err)
			}
			for _, f := range c.want {
				b, err := os.ReadFile(filepath.Join(dir, f))
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.HasPrefix(b, pngMagic) || len(b) < 5000 {
					t.Errorf("%s: not a PNG with content (%d bytes)", f, len(b))
				}
			}
			for _, f := range c.missing {
				if _, err := os.Stat(filepath.Join(dir, f)); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("%s: written although it should not be (%v)", f, err)
				}
			}
			b, err := os.ReadFile(filepath.Join(dir, ReportFile))
			if err != nil {
				t.Fatal(err)
			}
			md := string(b)
			for _, s := range c.text {
				if !strings.Contains(md, s) {
					t.Errorf("report.md lacks %q", s)
				}
			}
			for _, s := range c.notText {
				if strings.Contains(md, s) {
					t.Errorf("report.md contains %q", s)
				}
			}
			if c.in.Scores != nil {
				rows := []string{"| dense |", "| none |", "| diag |", "| **rotate** (exported) |"}
				at := -1
				for _, r := range rows {
					i := strings.Index(md, r)
					if i <= at {
						t.Fatalf("comparison rows out of SortedNames order at %q:\n%s", r, md)
					}
					at = i
				}
			}
			if entries, _ := os.ReadDir(filepath.Dir(dir)); len(entries) != 1 {
				t.Errorf("parent holds %d entries, want the report only", len(entries))
			}
		})
	}
	if *reportOut != "" {
		if err := WriteReport(*reportOut, base); err != nil {
			t.Fatal(err)
		}
	}
}

func TestReportWriteRefusesExisting(t *testing.T) {
	dir := t.TempDir()
	keep := filepath.Join(dir, "keep.txt")
	if err := os.WriteFile(keep, []byte("mine"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := WriteReport(dir, reportInput(t)); !errors.Is(err, ErrExists) {
		t.Fatalf("got %v, want ErrExists", err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil || len(entries) != 1 {
		t.Fatalf("existing directory changed: %d entries, %v", len(entries), err)
	}
	if parent, _ := os.ReadDir(filepath.Dir(dir)); len(parent) != 1 {
		t.Fatalf("parent of the existing directory holds %d entries, want 1", len(parent))
	}
}

func TestReportWriteLeavesNothingOnError(t *testing.T) {
	good := reportInput(t)
	badBlock := good
	badBlock.End = good.Start + 1
	badProfile := good
	prof := *good.Profile
	prof.ChanPatched = prof.ChanPatched[:3]
	badProfile.Profile = &prof
	badStart := good
	badStart.Start, badStart.End = 5, 5+good.NumPrune
	noCos := good
	noCos.Cosine = nil

	hookErr := errors.New("injected")
	for _, c := range []struct {
		name string
		in   ReportInput
		hook func(string) error
		want error
	}{
		{"end does not match", badBlock, nil, ErrReport},
		{"profile lengths", badProfile, nil, ErrReport},
		{"start outside", badStart, nil, ErrReport},
		{"no cosines", noCos, nil, ErrReport},
		{"failure after the plots", good, func(tmp string) error {
			if _, err := os.Stat(filepath.Join(tmp, ReportFile)); err != nil {
				t.Errorf("hook ran before report.md was written: %v", err)
			}
			return hookErr
		}, hookErr},
	} {
		t.Run(c.name, func(t *testing.T) {
			parent := t.TempDir()
			dir := filepath.Join(parent, "report")
			if err := writeReport(dir, c.in, c.hook); !errors.Is(err, c.want) {
				t.Fatalf("got %v, want %v", err, c.want)
			}
			if entries, _ := os.ReadDir(parent); len(entries) != 0 {
				t.Fatalf("left %d entries behind (%s)", len(entries), entries[0].Name())
			}
		})
	}
}

func TestReportFacts(t *testing.T) {
	got, n := meanAbsLogRatio([]float64{2, 1, 0, 3}, []float64{1, 2, 5, math.Inf(1)})
	if n != 2 || math.Abs(got-math.Ln2) > 1e-15 {
		t.Fatalf("meanAbsLogRatio = %g over %d, want ln 2 over 2", got, n)
	}
	if _, n := meanAbsLogRatio([]float64{0}, []float64{1}); n != 0 {
		t.Fatal("meanAbsLogRatio counted a zero entry")
	}
	out := outlierTokens([]float64{50, 1, 1, 1, 6, 1, 2})
	if len(out) != 2 || out[0] != 0 || out[1] != 4 {
		t.Fatalf("outlierTokens = %v, want [0 4]", out)
	}
	if got := median([]float64{3, math.NaN(), 1, 2, 10}); got != 2.5 {
		t.Fatalf("median = %g, want 2.5", got)
	}
	for _, c := range []struct {
		lo, hi float64
		want   []string
	}{{0, 4, []string{"0", "1", "2", "3", "4"}}, {-0.5, 31.5, []string{"0", "5", "10", "15", "20", "25", "30"}}, {0, 4095, []string{"0", "500", "1000", "1500", "2000", "2500", "3000", "3500", "4000"}}} {
		var labels []string
		for _, tk := range (intTicks{}).Ticks(c.lo, c.hi) {
			if tk.Label != "" {
				labels = append(labels, tk.Label)
			}
		}
		if strings.Join(labels, ",") != strings.Join(c.want, ",") {
			t.Errorf("ticks on [%g, %g]: %v, want %v", c.lo, c.hi, labels, c.want)
		}
	}
}
