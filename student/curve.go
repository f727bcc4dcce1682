package student

import (
	"fmt"
	"image/color"
	"math"
	"os"
	"path/filepath"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// CurvePoint is a loss after Step optimizer steps (Step 0: the initial patch P0).
type CurvePoint struct {
	Step int     `json:"step"`
	Loss float64 `json:"loss"`
}

var (
	colTrainRaw    = color.RGBA{R: 0x9e, G: 0xc5, B: 0xe6, A: 0xff} // light blue
	colTrainSmooth = color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff} // blue
	colValid       = color.RGBA{R: 0xff, G: 0x7f, B: 0x0e, A: 0xff} // orange
)

// WriteCurvePNG draws the training loss of every step (light), its moving average over
// about 2% of the steps (dark), and the validation loss (orange, with markers) against the
// step, into a 720×480 PNG at path (written to a temporary file and renamed). Non-finite
// losses are left out. It returns an error wrapping ErrOptions when no point is finite,
// or an I/O or rendering error.
func WriteCurvePNG(path string, train, valid []CurvePoint) (err error) {
	tr, va := finitePoints(train), finitePoints(valid)
	if len(tr) == 0 && len(va) == 0 {
		return fmt.Errorf("%w: no finite loss to plot", ErrOptions)
	}
	p := plot.New()
	p.Title.Text = "Distillation of the patch: loss per step"
	p.X.Label.Text = "optimizer step"
	p.Y.Label.Text = "loss"
	p.Add(plotter.NewGrid())
	p.Legend.Top = true
	if len(tr) > 0 {
		raw, err := plotter.NewLine(tr)
		if err != nil {
			return err
		}
		w := len(tr) / 50
		raw.Color, raw.Width = colTrainSmooth, vg.Points(1)
		if w > 1 { // the raw curve goes to the background behind its moving average
			raw.Color, raw.Width = colTrainRaw, vg.Points(0.75)
		}
		p.Add(raw)
		p.Legend.Add("train (per step)", raw)
		if w > 1 {
			sm, err := plotter.NewLine(movingAverage(tr, w))
			if err != nil {
				return err
			}
			sm.Color = colTrainSmooth
			sm.Width = vg.Points(1.5)
			p.Add(sm)
			p.Legend.Add(fmt.Sprintf("train (mean of %d steps)", w), sm)
		}
	}
	if len(va) > 0 {
		l, s, err := plotter.NewLinePoints(va)
		if err != nil {
			return err
		}
		l.Color, s.Color = colValid, colValid
		l.Width = vg.Points(1.5)
		s.Shape = draw.CircleGlyph{}
		s.Radius = vg.Points(2.5)
		p.Add(l, s)
		p.Legend.Add("validation", l, s)
	}
	return saveCurvePNG(p, path)
}

func finitePoints(c []CurvePoint) plotter.XYs {
	var out plotter.XYs
	for _, pt := range c {
		if !math.IsNaN(pt.Loss) && !math.IsInf(pt.Loss, 0) {
			out = append(out, plotter.XY{X: float64(pt.Step), Y: pt.Loss})
		}
	}
	return out
}

// movingAverage returns the trailing mean over w points (fewer at the start).
func movingAverage(xy plotter.XYs, w int) plotter.XYs {
	out := make(plotter.XYs, len(xy))
	var sum float64
	for i, pt := range xy {
		sum += pt.Y
		if i >= w {
			sum -= xy[i-w].Y
		}
		out[i] = plotter.XY{X: pt.X, Y: sum / float64(min(i+1, w))}
	}
	return out
}

// saveCurvePNG renders p at path through a temporary file. The plotting library panics on
// some inputs (a third-party renderer is a boundary): a panic comes back as an error.
func saveCurvePNG(p *plot.Plot, path string) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("student: rendering %s: %v", path, r)
		}
	}()
	c := vgimg.NewWith(vgimg.UseWH(6*vg.Inch, 4*vg.Inch), vgimg.UseDPI(120))
	p.Draw(draw.New(c))
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("student: write %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err = (vgimg.PngCanvas{Canvas: c}).WriteTo(f); err != nil {
		return fmt.Errorf("student: write %s: %w", path, err)
	}
	if err = f.Chmod(0o644); err != nil {
		return fmt.Errorf("student: write %s: %w", path, err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("student: write %s: %w", path, err)
	}
	if err = os.Rename(tmp, path); err != nil {
		return fmt.Errorf("student: write %s: %w", path, err)
	}
	return nil
}
