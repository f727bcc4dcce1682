package patch

import (
	"fmt"
	"image/color"
	"math"
	"os"
	"strconv"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// Plot geometry: 6×4 inch at 120 dpi (720×480 pixels).
const (
	reportPlotW   = 6 * vg.Inch
	reportPlotH   = 4 * vg.Inch
	reportPlotDPI = 120
	// reportLogRange is the max/min ratio above which a positive axis is drawn in log scale.
	reportLogRange = 20
)

var (
	colTarget   = color.RGBA{R: 0x20, G: 0x20, B: 0x20, A: 0xff} // near black
	colSource   = color.RGBA{R: 0xd6, G: 0x27, B: 0x28, A: 0xff} // red
	colPatched  = color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff} // blue
	colExcluded = color.RGBA{R: 0x99, G: 0x99, B: 0x99, A: 0xff} // grey
	colSelected = color.RGBA{R: 0xff, G: 0x7f, B: 0x0e, A: 0xff} // orange
)

// savePNG renders p into a PNG file at path. The plotting library panics on some inputs
// (a call into a third-party renderer is a boundary): a panic is returned as an error.
func savePNG(p *plot.Plot, path string) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("rendering %s: %v", path, r)
		}
	}()
	c := vgimg.NewWith(vgimg.UseWH(reportPlotW, reportPlotH), vgimg.UseDPI(reportPlotDPI))
	p.Draw(draw.New(c))
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: c}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// intTicks labels about a dozen integer positions (steps 1, 2, 5, 10, 20, 50, …), with
// unlabelled minor ticks at every integer when the range is short.
type intTicks struct{}

func (intTicks) Ticks(lo, hi float64) []plot.Tick {
	a, b := int(math.Ceil(lo)), int(math.Floor(hi))
	if a > b {
		return nil
	}
	step := 1
	for k := 0; (b-a)/step > 12; k++ {
		step = []int{2, 5, 10}[k%3] * pow10(k/3)
	}
	var ticks []plot.Tick
	for v := a; v <= b; v++ {
		switch {
		case v%step == 0:
			ticks = append(ticks, plot.Tick{Value: float64(v), Label: strconv.Itoa(v)})
		case b-a <= 60:
			ticks = append(ticks, plot.Tick{Value: float64(v)})
		}
	}
	return ticks
}

func pow10(k int) int {
	p := 1
	for range k {
		p *= 10
	}
	return p
}

// cosinePlot draws the mean cosine per candidate start: a line through all candidates,
// eligible ones as blue dots, excluded edges as grey crosses, the selected block as a large
// orange dot.
func cosinePlot(in *ReportInput) (*plot.Plot, error) {
	p := plot.New()
	n := in.NumPrune
	p.Title.Text = fmt.Sprintf("Mean cosine(X_i, X_i+%d) per candidate block, %d layers pruned", n, n)
	p.X.Label.Text = fmt.Sprintf("block start i (removes layers i..i+%d)", n-1)
	p.Y.Label.Text = "mean per-token cosine"
	p.X.Tick.Marker = intTicks{}
	p.Add(plotter.NewGrid())

	var all, eligible, excluded, selected plotter.XYs
	for i, c := range in.Cosine {
		if math.IsNaN(c) || math.IsInf(c, 0) {
			continue
		}
		pt := plotter.XY{X: float64(i), Y: c}
		all = append(all, pt)
		switch in.candidateKind(i) {
		case "selected":
			selected = append(selected, pt)
		case "excluded (edge)":
			excluded = append(excluded, pt)
		default:
			eligible = append(eligible, pt)
		}
	}
	if len(all) > 1 {
		l, err := plotter.NewLine(all)
		if err != nil {
			return nil, err
		}
		l.Color = colPatched
		l.Width = vg.Points(1)
		p.Add(l)
	}
	rows := 0 // legend entries
	add := func(pts plotter.XYs, label string, glyph draw.GlyphDrawer, col color.Color, r vg.Length) error {
		if len(pts) == 0 {
			return nil
		}
		s, err := plotter.NewScatter(pts)
		if err != nil {
			return err
		}
		s.GlyphStyle = draw.GlyphStyle{Color: col, Radius: r, Shape: glyph}
		p.Add(s)
		p.Legend.Add(label, s)
		rows++
		return nil
	}
	if err := add(eligible, "candidate", draw.CircleGlyph{}, colPatched, vg.Points(3)); err != nil {
		return nil, err
	}
	if err := add(excluded, "excluded (edge)", draw.CrossGlyph{}, colExcluded, vg.Points(4)); err != nil {
		return nil, err
	}
	if err := add(selected, fmt.Sprintf("selected: %d..%d", in.Start, in.End-1), draw.CircleGlyph{}, colSelected, vg.Points(6)); err != nil {
		return nil, err
	}
	p.X.Min, p.X.Max = -0.5, float64(len(in.Cosine))-0.5
	if len(all) > 0 {
		lo, hi := math.Inf(1), math.Inf(-1)
		for _, pt := range all {
			lo, hi = math.Min(lo, pt.Y), math.Max(hi, pt.Y)
		}
		setYRange(p, lo, hi, false, rows)
	}
	p.Legend.Top = true
	return p, nil
}

// channelPlot draws, per channel, target/source and target/patched (the factor by which the
// state fed to the kept layer is off; 1 is a perfect match). Channels where a ratio is not
// positive and finite are left out. When the patch is absent only target/source is drawn.
func channelPlot(space string, target, source, patched []float64, patchedLabel string) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = "Per-channel mean |target| / mean |input| at the cut, " + space + " space"
	p.X.Label.Text = "channel"
	p.Y.Label.Text = "magnitude ratio (1 = matched)"
	p.X.Tick.Marker = intTicks{}
	p.Add(plotter.NewGrid())

	ratios := func(num, den []float64) plotter.XYs {
		var pts plotter.XYs
		for c := range num {
			if r := num[c] / den[c]; positive(num[c]) && positive(den[c]) && positive(r) {
				pts = append(pts, plotter.XY{X: float64(c), Y: r})
			}
		}
		return pts
	}
	series := []struct {
		pts   plotter.XYs
		label string
		col   color.Color
		shape draw.GlyphDrawer
	}{{ratios(target, source), "target/source (plain pruning)", colSource, draw.CircleGlyph{}}}
	if !samePatch(source, patched) {
		series = append(series, struct {
			pts   plotter.XYs
			label string
			col   color.Color
			shape draw.GlyphDrawer
		}{ratios(target, patched), "target/" + patchedLabel, colPatched, draw.CircleGlyph{}})
	}
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, s := range series {
		for _, pt := range s.pts {
			lo, hi = math.Min(lo, pt.Y), math.Max(hi, pt.Y)
		}
	}
	r, rows := vg.Points(1.6), 0
	if len(target) <= 256 {
		r = vg.Points(2.5)
	}
	for _, s := range series {
		if len(s.pts) == 0 {
			continue
		}
		sc, err := plotter.NewScatter(s.pts)
		if err != nil {
			return nil, err
		}
		sc.GlyphStyle = draw.GlyphStyle{Color: s.col, Radius: r, Shape: s.shape}
		p.Add(sc)
		p.Legend.Add(s.label, sc)
		rows++
	}
	if lo <= hi {
		lo, hi = math.Min(lo, 1), math.Max(hi, 1)
		one, err := plotter.NewLine(plotter.XYs{{X: 0, Y: 1}, {X: float64(max(len(target)-1, 1)), Y: 1}})
		if err != nil {
			return nil, err
		}
		one.Color = colTarget
		one.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
		p.Add(one)
		setYRange(p, lo, hi, true, rows)
	}
	p.X.Min, p.X.Max = -0.5, float64(len(target))-0.5
	p.Legend.Top = true
	return p, nil
}

// tokenPlot draws the per-token magnitude (mean over channels of |·|) of the first profiled
// window for target, source and patched, and rings the target's outlier tokens.
func tokenPlot(prof *CutProfile, patchedLabel string) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = fmt.Sprintf("Per-token mean |x| over channels at the cut [%d, %d), first window", prof.Start, prof.End)
	p.X.Label.Text = "token position"
	p.Y.Label.Text = "token magnitude"
	p.X.Tick.Marker = intTicks{}
	p.Add(plotter.NewGrid())

	type series struct {
		v     []float64
		label string
		col   color.Color
		dash  []vg.Length
	}
	ss := []series{
		{prof.TokTarget, fmt.Sprintf("target X_%d (dense)", prof.End), colTarget, nil},
		{prof.TokSource, fmt.Sprintf("source X_%d (plain pruning)", prof.Start), colSource, nil},
	}
	if !samePatch(prof.TokSource, prof.TokPatched) {
		ss = append(ss, series{prof.TokPatched, patchedLabel, colPatched, []vg.Length{vg.Points(5), vg.Points(2)}})
	}
	lo, hi := math.Inf(1), math.Inf(-1)
	allPositive := true
	for _, s := range ss {
		for _, v := range s.v {
			if math.IsNaN(v) || math.IsInf(v, 0) {
				continue
			}
			allPositive = allPositive && v > 0
			lo, hi = math.Min(lo, v), math.Max(hi, v)
		}
	}
	logY := allPositive && lo > 0 && hi/lo > reportLogRange
	rows := 0 // legend entries
	for _, s := range ss {
		var pts plotter.XYs
		for t, v := range s.v {
			if math.IsNaN(v) || math.IsInf(v, 0) || (logY && v <= 0) {
				continue
			}
			pts = append(pts, plotter.XY{X: float64(t), Y: v})
		}
		if len(pts) == 0 {
			continue
		}
		if len(pts) == 1 { // a line needs two points: draw a lone point as a glyph
			sc, err := plotter.NewScatter(pts)
			if err != nil {
				return nil, err
			}
			sc.GlyphStyle = draw.GlyphStyle{Color: s.col, Radius: vg.Points(3), Shape: draw.CircleGlyph{}}
			p.Add(sc)
			p.Legend.Add(s.label, sc)
			rows++
			continue
		}
		l, err := plotter.NewLine(pts)
		if err != nil {
			return nil, err
		}
		l.Color, l.Width, l.Dashes = s.col, vg.Points(1.2), s.dash
		p.Add(l)
		p.Legend.Add(s.label, l)
		rows++
	}
	if out := outlierTokens(prof.TokTarget); len(out) > 0 {
		pts := make(plotter.XYs, len(out))
		for k, t := range out {
			pts[k] = plotter.XY{X: float64(t), Y: prof.TokTarget[t]}
		}
		sc, err := plotter.NewScatter(pts)
		if err != nil {
			return nil, err
		}
		sc.GlyphStyle = draw.GlyphStyle{Color: colSelected, Radius: vg.Points(5), Shape: draw.RingGlyph{}}
		p.Add(sc)
		p.Legend.Add(fmt.Sprintf("outlier token (≥ %.0f× median)", reportOutlierFactor), sc)
		rows++
	}
	if lo <= hi {
		setYRange(p, lo, hi, logY, rows)
	}
	p.X.Min, p.X.Max = -0.5, float64(len(prof.TokTarget))-0.5
	p.Legend.Top = true
	return p, nil
}

// setYRange sets the y axis to cover [lo, hi] — in log scale when logOK and both are
// positive and span more than reportLogRange — with headroom at the top for a legend of
// legendRows entries drawn inside the plot, so the legend does not cover the data.
func setYRange(p *plot.Plot, lo, hi float64, logOK bool, legendRows int) {
	room := math.Min(0.45, 0.08*float64(legendRows)) // share of the axis kept for the legend
	if logOK && lo > 0 && hi/lo > reportLogRange {
		p.Y.Scale = plot.LogScale{}
		p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
		// plot v0.17 centres the y label at the linear midpoint of the range, near the
		// top of a log axis, and shrinks the data area to fit it: the title says it all.
		p.Y.Label.Text = ""
		a, b := math.Log(lo/1.2), math.Log(hi*1.2)
		p.Y.Min, p.Y.Max = math.Exp(a), math.Exp(a+(b-a)/(1-room))
		return
	}
	pad := math.Max((hi-lo)*0.06, math.Abs(hi)*1e-3+1e-12)
	a, b := lo-pad, hi+pad
	if lo >= 0 && a < 0 {
		a = 0
	}
	p.Y.Min, p.Y.Max = a, a+(b-a)/(1-room)
}
