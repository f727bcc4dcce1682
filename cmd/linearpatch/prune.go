package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"linearpatch/model"
	"linearpatch/model/tensor"
	"linearpatch/patch"
)

func newPruneCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "prune --model PATH --calib FILE --num-prune n --out DIR",
		Short: "Select the block to prune, fit the training-free patch and export the pruned model",
		Long: `One calibration pass over the first --calib-windows windows of --calib gathers the
per-token cosine between X_i and X_{i+n} for every start i, the per-window channel magnitudes
of every layer (plain and Hadamard-rotated) and, for lstsq, the Gram sums. The block with the
highest mean cosine is pruned and the patch fitted by --method:

  rotate  P = H·diag(s)·Hᵀ, s = mean over windows of mean|X_j·H| / mean|X_i·H| (the paper)
  diag    P = diag(s), the same without H
  lstsq   P = (XᵢᵀXᵢ + λI)⁻¹·XᵢᵀX_j, λ = ridge·trace(XᵢᵀXᵢ)/d (after ReplaceMe)
  none    plain pruning
  all     fit every method; export the best by --eval perplexity (rotate without --eval)

The pruned model is written to --out as a Hugging Face directory (see README, "Exported
model layout"). --eval FILE adds a comparison table: perplexity, KL divergence to the dense
model and top-1 agreement with it, for the dense model, plain pruning and each method
(--protocol lines or join, see eval). --eval-tasks FILES adds the zero-shot accuracy on
each multiple-choice task (see eval --tasks) and the retained accuracy: the mean over tasks
of a variant's accuracy divided by the dense model's, for acc and acc_norm.`,
		Args: cobra.NoArgs,
		RunE: runPrune,
	}
	addPruneFlags(cmd)
	return cmd
}

// addPruneFlags declares the flags shared by prune and run.
func addPruneFlags(cmd *cobra.Command) {
	f := cmd.Flags()
	f.String("model", "", "original model: Hugging Face directory or llama2.c .bin (required)")
	f.String("calib", "", "calibration data: text or JSON Lines (required)")
	f.Int("calib-windows", 128, "calibration windows (the first N of --calib)")
	f.Int("seq-len", 256, "tokens per window")
	f.Int("num-prune", 0, "number of consecutive layers to remove (required)")
	f.String("method", "rotate", "patch: rotate, diag, lstsq, none or all")
	f.Bool("allow-edges", false, "also consider the first layer and blocks that end at the output")
	f.Float64("ridge", 1e-6, "lstsq ridge r: λ = r·trace(XᵢᵀXᵢ)/d")
	f.String("out", "", "output directory for the pruned model (must not exist; required)")
	f.String("eval", "", "evaluation data: adds the comparison table")
	f.Int("eval-windows", 0, "evaluate only the first N windows of --eval (0: all)")
	f.StringSlice("eval-tasks", nil, "multiple-choice task files (JSON Lines, see eval --tasks): adds accuracy and retained % to the comparison")
	addDataFlags(cmd, true)
	f.String("report", "", "write report.md and PNG plots to this directory (must not exist)")
	f.Bool("json", false, "print the result as one JSON object on the last line of stdout")
}

// pruneResult is prune's JSON output.
type pruneResult struct {
	Start    int                          `json:"start"`
	End      int                          `json:"end"`
	Method   string                       `json:"method"`
	Cosine   []float64                    `json:"cosine"`
	Out      string                       `json:"out"`
	Scale    []float64                    `json:"scale,omitempty"`
	PPL      map[string]float64           `json:"ppl,omitempty"`
	KL       map[string]float64           `json:"kl,omitempty"`
	Top1     map[string]float64           `json:"top1,omitempty"`
	Protocol model.Protocol               `json:"protocol,omitempty"` // of ppl, kl and top1
	Tasks    map[string]model.TasksResult `json:"tasks,omitempty"`
	Retained map[string]retainedJSON      `json:"retained,omitempty"`
	Report   string                       `json:"report,omitempty"`
	Seconds  float64                      `json:"seconds"`
	Calib    patch.Calibration            `json:"calibration"`
	Fitted   []string                     `json:"fitted"`
	Selected string                       `json:"selected_by"`
}

// pruneSpec is the validated input of a prune.
type pruneSpec struct {
	modelPath, calib, out, eval, report string
	calibWindows, seqLen, numPrune      int
	evalWindows                         int
	evalTasks                           []string
	data                                dataSpec
	methods                             []patch.Method
	all, allowEdges, json               bool
	ridge                               float64
}

func pruneSpecFrom(s settings) (pruneSpec, error) {
	p := pruneSpec{
		modelPath: s.str("model"), calib: s.str("calib"), out: s.str("out"), eval: s.str("eval"),
		report: s.str("report"), calibWindows: s.num("calib-windows"), seqLen: s.num("seq-len"),
		numPrune: s.num("num-prune"), evalWindows: s.num("eval-windows"), allowEdges: s.flag("allow-edges"),
		json: s.flag("json"), ridge: s.float("ridge"), evalTasks: s.list("eval-tasks"),
	}
	var err error
	if p.data, err = evalDataSpec(s); err != nil {
		return p, err
	}
	var missing []string
	for _, req := range []struct{ flag, val string }{{"--model", p.modelPath}, {"--calib", p.calib}, {"--out", p.out}} {
		if req.val == "" {
			missing = append(missing, req.flag)
		}
	}
	if len(missing) > 0 {
		return p, fmt.Errorf("%s required", strings.Join(missing, ", "))
	}
	switch {
	case p.numPrune < 1:
		return p, errors.New("--num-prune must be at least 1")
	case p.calibWindows < 1:
		return p, errors.New("--calib-windows must be at least 1")
	case p.seqLen < 2:
		return p, errors.New("--seq-len must be at least 2")
	case p.ridge < 0:
		return p, errors.New("--ridge must be ≥ 0")
	case p.evalWindows < 0:
		return p, errors.New("--eval-windows must be ≥ 0")
	}
	switch m := patch.Method(s.str("method")); m {
	case "all":
		p.all = true
		p.methods = []patch.Method{patch.MethodNone, patch.MethodDiag, patch.MethodRotate, patch.MethodLstsq}
	case patch.MethodNone, patch.MethodDiag, patch.MethodRotate, patch.MethodLstsq:
		p.methods = []patch.Method{m}
	default:
		return p, fmt.Errorf("--method %q: want rotate, diag, lstsq, none or all", m)
	}
	if p.report != "" && nested(p.out, p.report) {
		return p, fmt.Errorf("--out %s and --report %s must be separate directories, neither inside the other", p.out, p.report)
	}
	for _, path := range []string{p.out, p.report} {
		if path == "" {
			continue
		}
		if _, err := os.Stat(path); err == nil {
			return p, fmt.Errorf("%s already exists; remove it or choose another path", path)
		}
		if err := patch.CheckDest(path); err != nil { // before any work, not after it
			return p, err
		}
	}
	return p, nil
}

// nested reports whether a and b are the same path or one lies inside the other.
func nested(a, b string) bool {
	a, b = filepath.Clean(a), filepath.Clean(b)
	if aa, err := filepath.Abs(a); err == nil {
		a = aa
	}
	if bb, err := filepath.Abs(b); err == nil {
		b = bb
	}
	inside := func(x, y string) bool { r, err := filepath.Rel(y, x); return err == nil && filepath.IsLocal(r) }
	return a == b || inside(a, b) || inside(b, a)
}

func (p pruneSpec) wants(m patch.Method) bool {
	for _, x := range p.methods {
		if x == m {
			return true
		}
	}
	return false
}

func runPrune(cmd *cobra.Command, _ []string) error {
	s, err := resolve(cmd)
	if err != nil {
		return err
	}
	spec, err := pruneSpecFrom(s)
	if err != nil {
		return err
	}
	began := time.Now()
	ctx := cmd.Context()
	m, err := loadModel(ctx, spec.modelPath)
	if err != nil {
		return err
	}
	L := m.Config.Layers
	if spec.numPrune >= L-1 && !spec.allowEdges || spec.numPrune >= L {
		return fmt.Errorf("--num-prune %d: the model has %d layers; at most %d can be pruned (%d with --allow-edges)", spec.numPrune, L, max(L-2, 0), L-1)
	}
	tasks, err := loadTasks(spec.modelPath, spec.evalTasks, m.Vocab, m.Config.MaxSeq)
	if err != nil {
		return err
	}
	calib, err := loadWindows(ctx, spec.modelPath, spec.calib, m.Vocab, spec.seqLen, spec.calibWindows, spec.data.lines())
	if err != nil {
		return err
	}
	if len(calib) < spec.calibWindows {
		slog.Warn("calibration data is shorter than asked", "windows", len(calib), "asked", spec.calibWindows)
	}
	var evalWindows [][]int
	if spec.eval != "" {
		if evalWindows, err = loadWindows(ctx, spec.modelPath, spec.eval, m.Vocab, spec.seqLen, spec.evalWindows, spec.data); err != nil {
			return err
		}
	}
	h, err := patch.NewHadamard(m.Dim)
	if err != nil {
		if spec.wants(patch.MethodRotate) && !spec.all {
			return err
		}
		slog.Warn("no Hadamard matrix for this width; the rotate patch is skipped", "dim", m.Dim, "err", err)
		h = nil
		spec.methods = without(spec.methods, patch.MethodRotate)
	}

	// One calibration pass; the Gram sums for every candidate when they fit in memory,
	// else a second pass over the same windows for the chosen cut.
	opts := patch.StatsOptions{NumPrune: spec.numPrune}
	gramBytes := int64(L-spec.numPrune+1) * 2 * int64(m.Dim) * int64(m.Dim) * 8
	if spec.wants(patch.MethodLstsq) && gramBytes <= 1<<30 {
		opts.Gram = patch.GramAll
	}
	st := patch.NewStats(L, m.Dim, spec.numPrune, spec.seqLen)
	bar := newProgress("calibrate", "windows", len(calib))
	err = patch.Accumulate(ctx, m, h, calib, 0, opts, st, bar.Set)
	bar.Finish()
	if err != nil {
		return err
	}
	cos := st.Cosine()
	start, err := patch.Select(cos, L, spec.numPrune, spec.allowEdges)
	if err != nil {
		return err
	}
	end := start + spec.numPrune
	slog.Info("selected block", "start", start, "end", end, "cosine", cos[start])
	if spec.wants(patch.MethodLstsq) && opts.Gram != patch.GramAll {
		opts = patch.StatsOptions{NumPrune: spec.numPrune, Gram: patch.GramCut, Start: start}
		gram := patch.NewStats(L, m.Dim, spec.numPrune, spec.seqLen)
		bar := newProgress("gram sums", "windows", len(calib))
		err = patch.Accumulate(ctx, m, h, calib, 0, opts, gram, bar.Set)
		bar.Finish()
		if err != nil {
			return err
		}
		st.Gram = gram.Gram
	}

	patches := map[patch.Method]*tensor.Matrix{}
	scales := map[patch.Method][]float64{}
	for _, meth := range spec.methods {
		P, sc, err := patch.Fit(st, h, start, meth, spec.ridge)
		if err != nil {
			return err
		}
		patches[meth], scales[meth] = P, sc
	}

	res := pruneResult{Start: start, End: end, Cosine: cos, Out: spec.out,
		Calib: patch.Calibration{File: spec.calib, Windows: len(calib), SeqLen: spec.seqLen, Tokens: st.Tokens()}}
	for _, meth := range spec.methods {
		res.Fitted = append(res.Fitted, string(meth))
	}
	var scores map[string]patch.Score
	variants := []patch.Variant{{Name: string(patch.MethodNone)}}
	for _, meth := range spec.methods {
		if meth != patch.MethodNone {
			variants = append(variants, patch.Variant{Name: string(meth), P: patches[meth]})
		}
	}
	ev := evalTables{protocol: spec.data.protocol}
	if tasks != nil {
		bar := newProgress("tasks", "batches", model.TaskBatches(tasks, m.Vocab))
		ev.tasks, err = patch.CompareTasks(ctx, m, tasks, start, end, variants, bar.Set)
		bar.Finish()
		if err != nil {
			return err
		}
		res.Tasks, res.Retained = ev.tasks, ev.retained()
	}
	if evalWindows != nil {
		bar := newProgress("evaluate", "windows", len(evalWindows))
		scores, err = patch.Compare(ctx, m, evalWindows, start, end, variants, bar.Set)
		bar.Finish()
		if err != nil {
			return err
		}
		ev.scores, res.Protocol = scores, spec.data.protocol
		res.PPL, res.KL, res.Top1 = map[string]float64{}, map[string]float64{}, map[string]float64{}
		for n, sc := range scores {
			res.PPL[n], res.KL[n], res.Top1[n] = sc.PPL, sc.KL, sc.Top1
		}
	}

	chosen := spec.methods[0]
	res.Selected = "--method"
	if spec.all {
		chosen, res.Selected = patch.MethodRotate, "default (rotate; no --eval)"
		if h == nil {
			chosen = patch.MethodLstsq
		}
		if scores != nil {
			best := ""
			for _, meth := range spec.methods {
				if best == "" || scores[string(meth)].PPL < scores[best].PPL {
					best = string(meth)
				}
			}
			chosen, res.Selected = patch.Method(best), "lowest --eval perplexity"
		}
	}
	res.Method, res.Scale = string(chosen), scales[chosen]

	fp, err := model.Fingerprint(spec.modelPath)
	if err != nil {
		return err
	}
	rec := patch.Record{
		Source:      patch.SourceModel{Path: spec.modelPath, Fingerprint: fp, Layers: L, Dim: m.Dim},
		Start:       start,
		End:         end,
		Method:      string(chosen),
		Scale:       scales[chosen],
		Cosine:      cos,
		Calibration: res.Calib,
		Eval:        scores,
	}
	if scores != nil {
		rec.Extra = map[string]any{"eval_protocol": spec.data.protocol}
	}
	if ev.tasks != nil {
		if rec.Extra == nil {
			rec.Extra = map[string]any{}
		}
		rec.Extra["eval_tasks"] = ev.tasks
	}
	if chosen == patch.MethodLstsq {
		rec.Ridge = spec.ridge
	}
	// Every output is staged and committed together at the end: a failure leaves none.
	exported, err := patch.StageExport(spec.out, m, patches[chosen], rec)
	if err != nil {
		return err
	}
	defer exported.Discard()
	var report *patch.Staged
	if spec.report != "" {
		n := min(len(calib), 8)
		prof, err := patch.ProfileCut(ctx, m, h, calib[:n], start, end, patches[chosen])
		if err != nil {
			return err
		}
		in := patch.ReportInput{
			Model: spec.modelPath, NumPrune: spec.numPrune, Start: start, End: end, Method: string(chosen),
			AllowEdges: spec.allowEdges, Cosine: cos, Scores: scores, Profile: prof, Protocol: string(spec.data.protocol), Tasks: ev.tasks,
			Extra: []string{fmt.Sprintf("Calibration: %d windows of %d tokens from `%s`.", len(calib), spec.seqLen, spec.calib)},
		}
		if report, err = patch.StageReport(spec.report, in); err != nil {
			return err
		}
		defer report.Discard()
	}
	if err := commitOutputs(spec.out, exported, report); err != nil {
		return err
	}
	if report != nil {
		res.Report = spec.report
	}
	res.Seconds = time.Since(began).Seconds()
	printPruneTable(cmd.OutOrStdout(), res, ev)
	if spec.json {
		return json.NewEncoder(cmd.OutOrStdout()).Encode(res)
	}
	return nil
}

func without(ms []patch.Method, drop patch.Method) []patch.Method {
	var out []patch.Method
	for _, m := range ms {
		if m != drop {
			out = append(out, m)
		}
	}
	return out
}

// printPruneTable prints the selection and, with scores, the comparison as Markdown.
func printPruneTable(w io.Writer, res pruneResult, ev evalTables) {
	fmt.Fprintf(w, "pruned block [%d, %d) (mean cosine %.6f); method %s (%s); written to %s\n\n",
		res.Start, res.End, res.Cosine[res.Start], res.Method, res.Selected, res.Out)
	fmt.Fprintln(w, "| start | cosine |")
	fmt.Fprintln(w, "|---:|---:|")
	for i, c := range res.Cosine {
		mark := ""
		if i == res.Start {
			mark = " ←"
		}
		fmt.Fprintf(w, "| %d | %.6f%s |\n", i, c, mark)
	}
	if ev.empty() {
		return
	}
	printScores(w, ev)
	fmt.Fprintln(w)
}
