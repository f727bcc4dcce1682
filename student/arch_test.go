package student

import (
	"math"
	"os"
	"path/filepath"
	"testing"

	"linearpatch/model"
	"linearpatch/model/tensor"
)

// TestArchVariants runs the student on each architecture variant of tinystories-8L in
// ../shared/models/arch (LLaMA-3 rope scaling, Mistral's sliding window, Qwen2's biases,
// Qwen3's q/k norm): with the identity patch on the cut [3, 5), its logits equal the
// engine's pruned forward and its full-KL loss equals the KL computed from the engine's
// dense and pruned logits; a few AdamW steps then lower the loss. Windows of 96 tokens
// reach past Mistral's window of 48.
func TestArchVariants(t *testing.T) {
	const T, B, start, end = 96, 2, 3, 5
	for _, name := range []string{"llama3-rope", "mistral-swa", "qwen2-bias", "qwen3-qknorm"} {
		t.Run(name, func(t *testing.T) {
			dir := filepath.Join("..", "..", "shared", "models", "arch", name)
			if _, err := os.Stat(dir); err != nil {
				t.Fatalf("shared model missing (CI needs ../shared beside the repository): %v", err)
			}
			m, err := model.Load(dir)
			if err != nil {
				t.Fatal(err)
			}
			tok, err := model.LoadTokenizer(dir, m.Vocab)
			if err != nil {
				t.Fatal(err)
			}
			stream, err := model.ReadTokenStream(filepath.Join("..", "..", "shared", "data", "tinystories", "valid.txt"), tok, m.Vocab)
			if err != nil {
				t.Fatal(err)
			}
			ids := model.Windows(stream, T, B)
			hs := m.HiddenStates(ids, []int{start, m.Config.Layers})
			dense := m.Forward(ids)
			pruned := m.Pruned(start, end, nil).Forward(ids)

			s, err := NewSuffix(m, end, nil, SuffixOptions{SeqLen: T, Loss: LossFullKL})
			if err != nil {
				t.Fatal(err)
			}
			batch := make([]Example, B)
			d := m.Dim
			for b := range batch {
				batch[b] = Example{XCut: hs[start].Data[b*T*d : (b+1)*T*d], XFinal: hs[m.Config.Layers].Data[b*T*d : (b+1)*T*d]}
				got := s.Forward(batch[b].XCut)
				want := pruned.Data[b*T*m.Vocab : (b+1)*T*m.Vocab]
				var worst float64
				for i, v := range want {
					worst = math.Max(worst, math.Abs(float64(got[i]-v)))
				}
				if worst > 1e-4 {
					t.Fatalf("window %d: student logits differ from the engine's pruned forward by %.3g", b, worst)
				}
			}
			loss, err := s.Loss(batch)
			if err != nil {
				t.Fatal(err)
			}
			want := engineKL(dense, pruned, m.Vocab)
			if !near(loss, want, 1e-4) {
				t.Fatalf("student full-KL %.6f, from the engine's logits %.6f", loss, want)
			}
			opt := NewAdamW()
			last := loss
			for i := range 5 {
				l, grad, err := s.Step(batch)
				if err != nil {
					t.Fatal(err)
				}
				last = l
				p := s.P()
				opt.Update(p, grad, 1e-3)
				s.SetP(p)
				if i == 0 && l != loss {
					t.Fatalf("Step's loss %.6f, Loss %.6f", l, loss)
				}
			}
			t.Logf("KL of the pruned model %.5f (engine %.5f), after 4 steps %.5f", loss, want, last)
			if !(last < loss) {
				t.Fatalf("training did not lower the loss: %.6f -> %.6f", loss, last)
			}
		})
	}
}

// engineKL is the mean over rows of KL(softmax(p) ‖ softmax(q)) in float64.
func engineKL(p, q *tensor.Matrix, vocab int) float64 {
	var sum float64
	for r := range p.Rows {
		lp := refLogSoftmax(to64(p.Row(r)))
		lq := refLogSoftmax(to64(q.Row(r)))
		for j := range vocab {
			sum += math.Exp(lp[j]) * (lp[j] - lq[j])
		}
	}
	return sum / float64(p.Rows)
}
