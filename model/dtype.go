package model

import "linearpatch/model/tensor"

// WithDType returns a view of m whose weight matrices (embeddings, projections, head) are
// stored in dt: widened exactly to float32 for F32, rounded to nearest even for BF16 or F16;
// a matrix already in dt is shared, not copied. Norm weights, biases and the patch are
// shared (they stay float32); VectorDType becomes dt. Converting costs a new copy of every
// matrix that changes dtype.
func (m *Model) WithDType(dt tensor.DType) *Model {
	conv := func(w *tensor.Matrix) *tensor.Matrix { return convertMatrix(w, dt) }
	v := *m
	v.VectorDType = dt
	v.Embed = conv(m.Embed)
	if m.TiedHead && m.Head == m.Embed {
		v.Head = v.Embed
	} else {
		v.Head = conv(m.Head)
	}
	v.Layers = make([]*Layer, len(m.Layers))
	for i, ly := range m.Layers {
		if ly == nil {
			continue
		}
		v.Layers[i] = ly.WithDType(dt)
	}
	return &v
}

// WithDType returns a copy of ly whose projection matrices are stored in dt (see
// Model.WithDType); the norm weights and biases are shared.
func (ly *Layer) WithDType(dt tensor.DType) *Layer {
	c := *ly
	c.Wq, c.Wk, c.Wv, c.Wo = convertMatrix(ly.Wq, dt), convertMatrix(ly.Wk, dt), convertMatrix(ly.Wv, dt), convertMatrix(ly.Wo, dt)
	c.Wgate, c.Wup, c.Wdown = convertMatrix(ly.Wgate, dt), convertMatrix(ly.Wup, dt), convertMatrix(ly.Wdown, dt)
	return &c
}

// convertMatrix returns w stored in dt: w itself when it already is (or nil), else a copy.
func convertMatrix(w *tensor.Matrix, dt tensor.DType) *tensor.Matrix {
	switch {
	case w == nil || w.DType == dt:
		return w
	case dt == tensor.F32:
		return w.F32()
	}
	bits := make([]uint16, w.Rows*w.Cols)
	tensor.NarrowHalf(bits, w.F32().Data, dt)
	return tensor.FromHalf(w.Rows, w.Cols, dt, bits, nil)
}
