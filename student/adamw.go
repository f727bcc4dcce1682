package student

import (
	"fmt"
	"math"
)

// AdamW is torch.optim.AdamW over one flat parameter vector: decoupled weight decay
// (p ← p − lr·wd·p) followed by the Adam update with bias correction,
//
//	m ← β1·m + (1−β1)·g,  v ← β2·v + (1−β2)·g²,
//	p ← p − (lr/(1−β1^t))·m / (sqrt(v)/sqrt(1−β2^t) + eps).
//
// The moments are kept in float64. The zero value is not usable: start from NewAdamW or
// fill every field; M and V are allocated on the first Update.
type AdamW struct {
	LR, WeightDecay, Beta1, Beta2, Eps float64 // LR: base rate, for schedules (Update takes the rate to use)
	M, V                               []float64
	Step                               int // updates done
}

// NewAdamW returns an optimizer with the paper's settings: lr 1e-4, weight decay 1e-4,
// betas 0.9/0.999, eps 1e-8.
func NewAdamW() *AdamW {
	return &AdamW{LR: 1e-4, WeightDecay: 1e-4, Beta1: 0.9, Beta2: 0.999, Eps: 1e-8}
}

// Update applies one step with learning rate lr to p in place, given the gradient grad.
// It panics if len(grad) != len(p) or the moments were sized for another length.
func (a *AdamW) Update(p, grad []float32, lr float64) { adamUpdate(a, p, grad, lr) }

// Update64 is Update with a float64 gradient (a step's gradient summed over windows in
// float64, see StepGradient); Update(p, g) and Update64(p, float64(g)) agree bit for bit.
func (a *AdamW) Update64(p []float32, grad []float64, lr float64) { adamUpdate(a, p, grad, lr) }

func adamUpdate[G float32 | float64](a *AdamW, p []float32, grad []G, lr float64) {
	if len(grad) != len(p) {
		panic(fmt.Sprintf("student: AdamW.Update with %d parameters and %d gradients", len(p), len(grad)))
	}
	if a.M == nil && a.V == nil {
		a.M, a.V = make([]float64, len(p)), make([]float64, len(p))
	}
	if len(a.M) != len(p) || len(a.V) != len(p) {
		panic(fmt.Sprintf("student: AdamW moments hold %d/%d values, parameters %d", len(a.M), len(a.V), len(p)))
	}
	a.Step++
	bc1 := 1 - math.Pow(a.Beta1, float64(a.Step))
	bc2 := math.Sqrt(1 - math.Pow(a.Beta2, float64(a.Step)))
	step := lr / bc1
	decay := 1 - lr*a.WeightDecay
	for i, g32 := range grad {
		g := float64(g32)
		m := a.Beta1*a.M[i] + (1-a.Beta1)*g
		v := a.Beta2*a.V[i] + (1-a.Beta2)*g*g
		a.M[i], a.V[i] = m, v
		x := float64(p[i]) * decay
		p[i] = float32(x - step*m/(math.Sqrt(v)/bc2+a.Eps))
	}
}

// CosineLR returns the learning rate of step (0-based) of total under cosine annealing from
// base down to base·floorFrac (the paper: 1/20), the closed form of torch's
// CosineAnnealingLR(T_max=total, eta_min=base·floorFrac):
//
//	eta_min + (base − eta_min)·(1 + cos(π·step/total))/2.
//
// Step 0 gets base and step total gets eta_min; steps past total stay at eta_min (torch
// would climb back up), and total ≤ 0 gives base.
func CosineLR(base float64, step, total int, floorFrac float64) float64 {
	if total <= 0 {
		return base
	}
	step = min(max(step, 0), total)
	lo := base * floorFrac
	return lo + (base-lo)*(1+math.Cos(math.Pi*float64(step)/float64(total)))/2
}
