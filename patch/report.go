package patch

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"linearpatch/model"
	"linearpatch/model/tensor"
)

// ErrProfile is wrapped by the error ProfileCut returns when its arguments do not fit the
// model (no windows, ragged windows, ids outside the vocabulary, a patch or Hadamard of the
// wrong order, a model that already carries a patch or lacks the layers before the cut).
var ErrProfile = errors.New("patch: cannot profile the cut")

// ErrReport is wrapped by the error WriteReport returns for an inconsistent ReportInput.
var ErrReport = errors.New("patch: invalid report input")

// File names inside a report directory.
const (
	ReportFile          = "report.md"
	reportCosinePNG     = "cosine.png"
	reportChannelsPNG   = "channels.png"
	reportChanRotPNG    = "channels_rotated.png"
	reportTokensPNG     = "tokens.png"
	profileBatchRows    = 2048 // rows of one ProfileCut forward
	reportOutlierFactor = 5.0  // a token is an outlier when its target magnitude ≥ this × the median
)

// CutProfile describes the activations at a cut [Start, End), for the report.
type CutProfile struct {
	Start, End int
	// Per channel (len d): mean over the profiled tokens of |·| in plain space — the state
	// entering the kept layer in the dense model X_End ("target"), the state at the cut
	// X_Start ("source", what plain pruning feeds on), and X_Start·P ("patched").
	ChanTarget, ChanSource, ChanPatched []float64
	// The same in the rotated space (·H); nil when h is nil.
	RotTarget, RotSource, RotPatched []float64
	// Per token of the first profiled window (len T): mean over channels of |·| — showing
	// outlier tokens.
	TokTarget, TokSource, TokPatched []float64
}

// ProfileCut runs m on windows (a few are enough, e.g. 8) to layer end, capturing X_start
// and X_end, and computes the profile for patch P (d×d, applied as X_start·P; nil: no patch,
// patched = source). h, when non-nil, must have order d; the rotated profile is then
// computed in float64 with h.Rotate, as Accumulate does. Sums run in float64 in window and
// token order.
//
// m must be the dense model (no patch) with its embeddings and layers 0..end−1 loaded.
// Errors: the model's error (model.ErrConfig) for a block outside the model; ErrProfile for
// arguments that do not fit; ctx's error when ctx ends (checked between batches).
func ProfileCut(ctx context.Context, m *model.Model, h *Hadamard, windows [][]int, start, end int, P *tensor.Matrix) (*CutProfile, error) {
	if err := m.CheckBlock(start, end); err != nil {
		return nil, err
	}
	d := m.Dim
	switch {
	case len(windows) == 0 || len(windows[0]) == 0:
		return nil, fmt.Errorf("%w: no tokens to profile", ErrProfile)
	case m.Patch != nil:
		return nil, fmt.Errorf("%w: the model carries a patch: profile the dense model", ErrProfile)
	case m.Embed == nil || len(m.Layers) < end || slices.Contains(m.Layers[:end], nil):
		return nil, fmt.Errorf("%w: the model lacks its embeddings or a layer before %d", ErrProfile, end)
	case h != nil && h.Dim() != d:
		return nil, fmt.Errorf("%w: Hadamard matrix of order %d, want %d", ErrProfile, h.Dim(), d)
	case P != nil && (P.Rows != d || P.Cols != d || len(P.Data) != d*d):
		return nil, fmt.Errorf("%w: patch is %d×%d, want %d×%d", ErrProfile, P.Rows, P.Cols, d, d)
	}
	T := len(windows[0])
	for k, w := range windows {
		if len(w) != T {
			return nil, fmt.Errorf("%w: window %d has %d tokens, want %d", ErrProfile, k, len(w), T)
		}
		for _, id := range w {
			if id < 0 || id >= m.Vocab {
				return nil, fmt.Errorf("%w: window %d holds token id %d outside the vocabulary [0,%d)", ErrProfile, k, id, m.Vocab)
			}
		}
	}

	p := &CutProfile{
		Start: start, End: end,
		ChanTarget: make([]float64, d), ChanSource: make([]float64, d), ChanPatched: make([]float64, d),
		TokTarget: make([]float64, T), TokSource: make([]float64, T), TokPatched: make([]float64, T),
	}
	var rot []float64
	if h != nil {
		p.RotTarget, p.RotSource, p.RotPatched = make([]float64, d), make([]float64, d), make([]float64, d)
		rot = make([]float64, d)
	}
	bs := max(1, profileBatchRows/T)
	var patched *tensor.Matrix
	for lo := 0; lo < len(windows); lo += bs {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		batch := windows[lo:min(lo+bs, len(windows))]
		x := m.Embeddings(batch)
		if err := m.RunLayersContext(ctx, x, T, 0, start, nil); err != nil {
			return nil, err
		}
		src := x.Clone()
		if err := m.RunLayersContext(ctx, x, T, start, end, nil); err != nil {
			return nil, err
		}
		pat := src
		if P != nil {
			if patched == nil || patched.Rows != src.Rows {
				patched = tensor.New(src.Rows, d)
			}
			tensor.MulSeq(patched, src, P, T)
			pat = patched
		}
		for _, s := range []struct {
			x             *tensor.Matrix
			chn, rotd, tk []float64
		}{
			{x, p.ChanTarget, p.RotTarget, p.TokTarget},
			{src, p.ChanSource, p.RotSource, p.TokSource},
			{pat, p.ChanPatched, p.RotPatched, p.TokPatched},
		} {
			for r := range s.x.Rows {
				row := s.x.Row(r)
				var tok float64
				for c, v := range row {
					a := math.Abs(float64(v))
					s.chn[c] += a
					tok += a
				}
				if lo == 0 && r < T { // the first window
					s.tk[r] = tok / float64(d)
				}
				if h != nil {
					for c, v := range row {
						rot[c] = float64(v)
					}
					h.Rotate(rot)
					for c, v := range rot {
						s.rotd[c] += math.Abs(v)
					}
				}
			}
		}
	}
	n := float64(len(windows) * T)
	for _, v := range [][]float64{p.ChanTarget, p.ChanSource, p.ChanPatched, p.RotTarget, p.RotSource, p.RotPatched} {
		for c := range v {
			v[c] /= n
		}
	}
	return p, nil
}

// validate reports whether the profile's slices have consistent lengths.
func (p *CutProfile) validate() error {
	d := len(p.ChanTarget)
	if d == 0 || len(p.ChanSource) != d || len(p.ChanPatched) != d {
		return fmt.Errorf("%w: profile channel vectors have lengths %d, %d, %d", ErrReport, len(p.ChanTarget), len(p.ChanSource), len(p.ChanPatched))
	}
	rot := []int{len(p.RotTarget), len(p.RotSource), len(p.RotPatched)}
	if !slices.Equal(rot, []int{0, 0, 0}) && !slices.Equal(rot, []int{d, d, d}) {
		return fmt.Errorf("%w: rotated profile vectors have lengths %v, want all 0 or %d", ErrReport, rot, d)
	}
	if T := len(p.TokTarget); len(p.TokSource) != T || len(p.TokPatched) != T {
		return fmt.Errorf("%w: profile token vectors have lengths %d, %d, %d", ErrReport, T, len(p.TokSource), len(p.TokPatched))
	}
	return nil
}

// ReportInput is everything the report shows.
type ReportInput struct {
	Model      string           // path or name of the original model
	NumPrune   int              // n
	Start, End int              // the pruned block [Start, End), End = Start + NumPrune
	Method     string           // the exported method
	AllowEdges bool             // whether starts 0 and L−n were candidates
	Cosine     []float64        // mean cosine per candidate start 0..L−n
	Scores     map[string]Score // may be nil (no --eval); keys dense/none/diag/rotate/lstsq
	Protocol   string           // the perplexity protocol of Scores (lines or join)
	// Tasks is the zero-shot accuracy per variant, keyed like Scores; nil: no --eval-tasks.
	Tasks   map[string]model.TasksResult
	Profile *CutProfile // may be nil: no channel and token plots
	Extra   []string    // free markdown lines appended (e.g. timings)
}

// layers returns L, the depth of the original model.
func (in *ReportInput) layers() int { return len(in.Cosine) + in.NumPrune - 1 }

func (in *ReportInput) validate() error {
	switch {
	case in.NumPrune < 1:
		return fmt.Errorf("%w: %d layers pruned", ErrReport, in.NumPrune)
	case len(in.Cosine) == 0:
		return fmt.Errorf("%w: no candidate cosines", ErrReport)
	case in.Start < 0 || in.Start >= len(in.Cosine) || in.End != in.Start+in.NumPrune:
		return fmt.Errorf("%w: block [%d, %d) is not a block of %d among %d candidate starts", ErrReport, in.Start, in.End, in.NumPrune, len(in.Cosine))
	}
	if p := in.Profile; p != nil {
		if p.Start != in.Start || p.End != in.End {
			return fmt.Errorf("%w: profile of the cut [%d, %d), report of [%d, %d)", ErrReport, p.Start, p.End, in.Start, in.End)
		}
		return p.validate()
	}
	return nil
}

// WriteReport writes dir/report.md and its PNG plots (cosine.png; channels.png,
// channels_rotated.png and tokens.png when in.Profile is set, channels_rotated.png only when
// the profile has a rotated part). Everything is written into a temporary sibling directory
// that is renamed to dir at the end, so on error nothing appears at dir and the temporary
// directory is removed. dir must not exist (ErrExists); its parent is created if needed.
//
// Errors: ErrExists; ErrReport for an inconsistent input (checked before anything is
// written); I/O errors; a panic inside the plotting library is returned as an error.
func WriteReport(dir string, in ReportInput) error {
	return writeReport(dir, in, nil)
}

// writeReport is WriteReport with a hook run on the temporary directory just before the
// rename; an error from it fails the report (tests use it to check the clean-up).
func writeReport(dir string, in ReportInput, beforeRename func(tmp string) error) error {
	st, err := StageReport(dir, in)
	if err != nil {
		return err
	}
	if beforeRename != nil {
		if err := beforeRename(st.Dir()); err != nil {
			st.Discard()
			return fmt.Errorf("patch: report %s: %w", dir, err)
		}
	}
	if err := st.Commit(); err != nil {
		return fmt.Errorf("patch: report %s: %w", dir, err)
	}
	return nil
}

// StageReport is WriteReport without the final rename: the caller commits the returned
// Staged (or discards it) together with its other outputs.
func StageReport(dir string, in ReportInput) (*Staged, error) {
	if dir == "" {
		return nil, fmt.Errorf("%w: empty report directory", ErrReport)
	}
	if _, err := os.Lstat(dir); err == nil {
		return nil, fmt.Errorf("%w: %s", ErrExists, dir)
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("patch: report: %w", err)
	}
	if err := in.validate(); err != nil {
		return nil, err
	}
	st, err := stage(dir)
	if err != nil {
		return nil, fmt.Errorf("patch: report: %w", err)
	}
	fail := func(err error) (*Staged, error) {
		st.Discard()
		return nil, fmt.Errorf("patch: report %s: %w", dir, err)
	}
	images, err := writeReportPlots(st.Dir(), &in)
	if err != nil {
		return fail(err)
	}
	md := reportMarkdown(&in, images)
	if err := os.WriteFile(filepath.Join(st.Dir(), ReportFile), []byte(md), 0o644); err != nil {
		return fail(err)
	}
	return st, nil
}

// reportImages says which plots were written.
type reportImages struct {
	cosine, channels, channelsRot, tokens bool
}

// writeReportPlots writes the plots the input allows into dir.
func writeReportPlots(dir string, in *ReportInput) (reportImages, error) {
	var im reportImages
	p, err := cosinePlot(in)
	if err != nil {
		return im, err
	}
	if err := savePNG(p, filepath.Join(dir, reportCosinePNG)); err != nil {
		return im, err
	}
	im.cosine = true
	prof := in.Profile
	if prof == nil {
		return im, nil
	}
	patched := reportPatchedLabel(in)
	p, err = channelPlot("plain", prof.ChanTarget, prof.ChanSource, prof.ChanPatched, patched)
	if err != nil {
		return im, err
	}
	if err := savePNG(p, filepath.Join(dir, reportChannelsPNG)); err != nil {
		return im, err
	}
	im.channels = true
	if prof.RotTarget != nil {
		p, err = channelPlot("rotated (·H)", prof.RotTarget, prof.RotSource, prof.RotPatched, patched)
		if err != nil {
			return im, err
		}
		if err := savePNG(p, filepath.Join(dir, reportChanRotPNG)); err != nil {
			return im, err
		}
		im.channelsRot = true
	}
	if len(prof.TokTarget) > 0 {
		p, err = tokenPlot(prof, patched)
		if err != nil {
			return im, err
		}
		if err := savePNG(p, filepath.Join(dir, reportTokensPNG)); err != nil {
			return im, err
		}
		im.tokens = true
	}
	return im, nil
}

// reportPatchedLabel names the patched state after the exported method.
func reportPatchedLabel(in *ReportInput) string {
	if in.Method == "" {
		return "patched"
	}
	return "patched (" + in.Method + ")"
}

// samePatch reports whether the patched profile equals the source (no patch).
func samePatch(source, patched []float64) bool { return slices.Equal(source, patched) }

// meanAbsLogRatio returns the mean over i of |log(a[i]/b[i])| and the number of entries
// counted: those where both are positive and finite.
func meanAbsLogRatio(a, b []float64) (float64, int) {
	var sum float64
	var n int
	for i := range a {
		if !positive(a[i]) || !positive(b[i]) {
			continue
		}
		sum += math.Abs(math.Log(a[i] / b[i]))
		n++
	}
	if n == 0 {
		return math.NaN(), 0
	}
	return sum / float64(n), n
}

func positive(v float64) bool { return v > 0 && !math.IsInf(v, 0) }

// median returns the median of the finite entries of v (NaN when there are none).
func median(v []float64) float64 {
	s := make([]float64, 0, len(v))
	for _, x := range v {
		if !math.IsNaN(x) && !math.IsInf(x, 0) {
			s = append(s, x)
		}
	}
	if len(s) == 0 {
		return math.NaN()
	}
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// outlierTokens returns the positions whose value is at least reportOutlierFactor times the
// median, largest first.
func outlierTokens(v []float64) []int {
	med := median(v)
	if !positive(med) {
		return nil
	}
	var out []int
	for t, x := range v {
		if x >= reportOutlierFactor*med {
			out = append(out, t)
		}
	}
	slices.SortStableFunc(out, func(a, b int) int {
		switch {
		case v[a] > v[b]:
			return -1
		case v[a] < v[b]:
			return 1
		}
		return 0
	})
	return out
}

// candidateKind classifies candidate start i of the cosine table.
func (in *ReportInput) candidateKind(i int) string {
	switch {
	case i == in.Start:
		return "selected"
	case !in.AllowEdges && (i == 0 || i == len(in.Cosine)-1):
		return "excluded (edge)"
	}
	return ""
}

func reportMarkdown(in *ReportInput, im reportImages) string {
	var b strings.Builder
	L, n := in.layers(), in.NumPrune
	pf := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }

	pf("# LinearPatch pruning report\n\n")
	pf("- Model: `%s` (%d layers)\n", strings.ReplaceAll(in.Model, "`", "'"), L)
	pf("- Pruned block: layers %d..%d (`[%d, %d)`, %d layers); layer %d now receives the state that entered layer %d\n",
		in.Start, in.End-1, in.Start, in.End, n, in.End, in.Start)
	pf("- Exported method: **%s**\n", mdCell(in.Method))
	if in.AllowEdges {
		pf("- Candidates: every start 0..%d (edges allowed)\n", len(in.Cosine)-1)
	} else {
		pf("- Candidates: starts 1..%d (the first layer and a block ending at the output are excluded, as in the paper's code)\n", len(in.Cosine)-2)
	}
	b.WriteString("\n")

	pf("## Block selection\n\n")
	pf("Mean per-token cosine similarity between the hidden state entering layer i and the one entering layer i+%d, over the calibration tokens; the block with the highest similarity among the candidates is pruned.\n\n", n)
	if im.cosine {
		pf("![mean cosine per candidate block](%s)\n\n", reportCosinePNG)
	}
	pf("| start | layers removed | mean cosine | |\n|---:|:---|---:|:---|\n")
	for i, c := range in.Cosine {
		kind := in.candidateKind(i)
		if kind == "selected" {
			pf("| **%d** | **%d..%d** | **%.5f** | **selected** |\n", i, i, i+n-1, c)
			continue
		}
		pf("| %d | %d..%d | %.5f | %s |\n", i, i, i+n-1, c, kind)
	}
	b.WriteString("\n")
	for _, line := range cosineFacts(in) {
		pf("%s\n", line)
	}
	b.WriteString("\n")

	if in.Scores != nil || in.Tasks != nil {
		pf("## Evaluation\n\n")
		head, rule := "| method |", "|:---|"
		if in.Scores != nil {
			proto := ""
			if in.Protocol != "" {
				proto = fmt.Sprintf(" (%s protocol)", mdCell(in.Protocol))
			}
			pf("Perplexity on the evaluation windows%s; KL(dense ‖ variant) per prediction in nats; top-1 is the fraction of predictions whose argmax equals the dense model's.\n\n", proto)
			head, rule = head+" perplexity | Δ vs dense | KL | top-1 |", rule+"---:|---:|---:|---:|"
		}
		if in.Tasks != nil {
			pf("Zero-shot multiple-choice accuracy per task (acc / acc_norm); retained = the mean over tasks of the variant's accuracy divided by the dense model's.\n\n")
			for _, c := range TaskColumns(in.Tasks) {
				head, rule = head+" "+mdCell(c)+" |", rule+"---:|"
			}
		}
		pf("%s\n%s\n", head, rule)
		dense, hasDense := in.Scores[DenseName]
		for _, name := range evalNames(in.Scores, in.Tasks) {
			label := mdCell(name)
			if name == in.Method {
				label = "**" + label + "** (exported)"
			}
			row := "| " + label + " |"
			if in.Scores != nil {
				s, ok := in.Scores[name]
				if !ok {
					row += " — | — | — | — |"
				} else {
					delta := "—"
					if hasDense && name != DenseName {
						delta = fmt.Sprintf("%+.3f (%+.1f%%)", s.PPL-dense.PPL, 100*(s.PPL-dense.PPL)/dense.PPL)
					}
					kl, top1 := fmt.Sprintf("%.4f", s.KL), fmt.Sprintf("%.1f%%", 100*s.Top1)
					if name == DenseName {
						kl, top1 = "0", "100%"
					}
					row += fmt.Sprintf(" %.3f | %s | %s | %s |", s.PPL, delta, kl, top1)
				}
			}
			for _, c := range TaskCells(in.Tasks, name) {
				row += " " + c + " |"
			}
			pf("%s\n", row)
		}
		b.WriteString("\n")
		if in.Scores != nil {
			for _, line := range scoreFacts(in) {
				pf("%s\n", line)
			}
			b.WriteString("\n")
		}
	}

	if p := in.Profile; p != nil {
		pf("## Activations at the cut\n\n")
		pf("Target: the state entering layer %d in the dense model (X_%d). Source: the state at the cut (X_%d), which plain pruning feeds to layer %d. Patched: X_%d·P for the exported patch. Magnitudes are means of |·| over the profiled tokens.\n\n",
			in.End, in.End, in.Start, in.End, in.Start)
		if im.channels {
			pf("### Per channel, plain space\n\n![per-channel magnitude ratio, plain space](%s)\n\n", reportChannelsPNG)
			pf("%s\n\n", channelFact("plain", p.ChanTarget, p.ChanSource, p.ChanPatched))
		}
		if im.channelsRot {
			pf("### Per channel, rotated space (·H)\n\n![per-channel magnitude ratio, rotated space](%s)\n\n", reportChanRotPNG)
			pf("%s\n\n", channelFact("rotated", p.RotTarget, p.RotSource, p.RotPatched))
		}
		if im.tokens {
			pf("### Per token\n\n![per-token magnitude](%s)\n\n", reportTokensPNG)
			for _, line := range tokenFacts(p) {
				pf("%s\n", line)
			}
			b.WriteString("\n")
		}
	}

	if len(in.Extra) > 0 {
		pf("## Notes\n\n")
		for _, line := range in.Extra {
			pf("%s\n", line)
		}
		b.WriteString("\n")
	}
	return b.String()
}

// mdCell makes s safe inside a markdown table cell.
func mdCell(s string) string {
	return strings.NewReplacer("|", `\|`, "\n", " ").Replace(s)
}

// cosineFacts reads the cosine plot in words.
func cosineFacts(in *ReportInput) []string {
	sel := in.Cosine[in.Start]
	var eligible, better int
	best := -1
	for i, c := range in.Cosine {
		if math.IsNaN(c) {
			continue
		}
		if best < 0 || c > in.Cosine[best] {
			best = i
		}
		if in.candidateKind(i) == "excluded (edge)" {
			continue
		}
		eligible++
		if c > sel {
			better++
		}
	}
	lines := []string{fmt.Sprintf("Reading: the selected block starts at layer %d with mean cosine %.5f, rank %d of %d eligible candidates.", in.Start, sel, better+1, eligible)}
	if best >= 0 && best != in.Start && in.Cosine[best] > sel {
		why := ""
		if in.candidateKind(best) == "excluded (edge)" {
			why = " but is an excluded edge block"
		}
		lines = append(lines, fmt.Sprintf("The highest cosine overall, %.5f, is at start %d%s.", in.Cosine[best], best, why))
	}
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, c := range in.Cosine {
		if !math.IsNaN(c) {
			lo, hi = math.Min(lo, c), math.Max(hi, c)
		}
	}
	if lo <= hi {
		lines = append(lines, fmt.Sprintf("Candidate cosines range from %.5f to %.5f.", lo, hi))
	}
	return lines
}

// scoreFacts reads the evaluation table in words: the share of plain pruning's perplexity
// gap each patch closes.
func scoreFacts(in *ReportInput) []string {
	dense, okD := in.Scores[DenseName]
	none, okN := in.Scores[string(MethodNone)]
	if !okD || !okN || !(none.PPL > dense.PPL) {
		return nil
	}
	gap := none.PPL - dense.PPL
	lines := []string{fmt.Sprintf("Reading: plain pruning raises perplexity from %.3f to %.3f.", dense.PPL, none.PPL)}
	for _, name := range SortedNames(in.Scores) {
		if name == DenseName || name == string(MethodNone) {
			continue
		}
		s := in.Scores[name]
		lines = append(lines, fmt.Sprintf("- %s closes %.1f%% of that gap (perplexity %.3f, top-1 agreement %.1f%% vs %.1f%% without a patch).",
			mdCell(name), 100*(none.PPL-s.PPL)/gap, s.PPL, 100*s.Top1, 100*none.Top1))
	}
	return lines
}

// channelFact reads a channel plot in words.
func channelFact(space string, target, source, patched []float64) string {
	before, nb := meanAbsLogRatio(target, source)
	after, _ := meanAbsLogRatio(target, patched)
	worst, worstLog := -1, 0.0
	for c := range target {
		if positive(target[c]) && positive(source[c]) {
			if l := math.Abs(math.Log(target[c] / source[c])); l > worstLog {
				worst, worstLog = c, l
			}
		}
	}
	if nb == 0 {
		return fmt.Sprintf("Reading (%s space): no channel has a positive magnitude on both sides of the cut.", space)
	}
	var s string
	if samePatch(source, patched) {
		s = fmt.Sprintf("Reading (%s space): mean |log(target/source)| per channel is %.4f (a typical channel is off by a factor %.3f); there is no patch, so the patched state is the source.",
			space, before, math.Exp(before))
	} else {
		verb := "falls"
		if !(after < before) {
			verb = "goes"
		}
		s = fmt.Sprintf("Reading (%s space): mean |log(target/·)| per channel %s from %.4f without a patch (a typical channel off by a factor %.3f) to %.4f after the patch (factor %.3f), %s.",
			space, verb, before, math.Exp(before), after, math.Exp(after), changeWord(before, after))
	}
	if worst >= 0 {
		s += fmt.Sprintf(" The most mismatched channel before the patch is %d, target/source = %.3g", worst, target[worst]/source[worst])
		if !samePatch(source, patched) && positive(patched[worst]) {
			s += fmt.Sprintf(", target/patched = %.3g there", target[worst]/patched[worst])
		}
		s += "."
	}
	return s
}

// changeWord says how the mismatch moved from before to after.
func changeWord(before, after float64) string {
	switch {
	case math.IsNaN(before) || math.IsNaN(after):
		return "not comparable"
	case after < before:
		return fmt.Sprintf("%.0f%% smaller", 100*(1-after/before))
	case after > before:
		return fmt.Sprintf("%.0f%% larger", 100*(after/before-1))
	}
	return "unchanged"
}

// tokenFacts reads the token plot in words.
func tokenFacts(p *CutProfile) []string {
	var lines []string
	med := median(p.TokTarget)
	out := outlierTokens(p.TokTarget)
	switch {
	case len(out) == 0:
		lines = append(lines, fmt.Sprintf("Reading: no token of the first profiled window has a target magnitude %.0f× the median (%.4g) or more.", reportOutlierFactor, med))
	default:
		show := out[:min(len(out), 5)]
		parts := make([]string, len(show))
		for k, t := range show {
			parts[k] = fmt.Sprintf("%d (%.1f× the median)", t, p.TokTarget[t]/med)
		}
		more := ""
		if len(out) > len(show) {
			more = fmt.Sprintf(" and %d more", len(out)-len(show))
		}
		lines = append(lines, fmt.Sprintf("Reading: outlier tokens in the target (≥ %.0f× the median magnitude %.4g): position %s%s.", reportOutlierFactor, med, strings.Join(parts, ", "), more))
	}
	before, nb := meanAbsLogRatio(p.TokTarget, p.TokSource)
	if nb > 0 {
		s := fmt.Sprintf("The mean |log(target/source)| per token is %.4f", before)
		if samePatch(p.TokSource, p.TokPatched) {
			s += " (no patch)."
		} else {
			after, _ := meanAbsLogRatio(p.TokTarget, p.TokPatched)
			s += fmt.Sprintf(" and %.4f after the patch, %s.", after, changeWord(before, after))
		}
		lines = append(lines, s)
	}
	return lines
}
