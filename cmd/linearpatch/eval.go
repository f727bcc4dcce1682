package main

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"linearpatch/model"
)

func newEvalCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "eval --model PATH --data FILE",
		Short: "Perplexity of a model on a data file by the windows protocol",
		Long: `Perplexity by the windows protocol: the data file is tokenized as one stream (a text
file: every non-blank line is one document, BOS + its SentencePiece ids; a JSON Lines file:
each line's input_ids), cut into consecutive non-overlapping windows of --seq-len tokens
(the remainder dropped), each window run from position 0; the reported perplexity is exp of
the mean next-token negative log-likelihood over all seq-len−1 predictions of every window.`,
		Args: cobra.NoArgs,
		RunE: runEval,
	}
	f := cmd.Flags()
	f.String("model", "", "model: a Hugging Face directory or a llama2.c .bin file (required)")
	f.String("data", "", "evaluation data: a text file or JSON Lines with input_ids (required)")
	f.Int("seq-len", 256, "tokens per window")
	f.Int("max-windows", 0, "evaluate only the first N windows (0: all)")
	f.Bool("json", false, "print the result as one JSON object on the last line of stdout")
	return cmd
}

func runEval(cmd *cobra.Command, _ []string) error {
	s, err := resolve(cmd)
	if err != nil {
		return err
	}
	m, err := loadModel(s.str("model"))
	if err != nil {
		return err
	}
	windows, err := loadWindows(s.str("model"), s.str("data"), m.Vocab, s.num("seq-len"), s.num("max-windows"))
	if err != nil {
		return err
	}
	bar := newProgress("eval", "windows", len(windows))
	res, err := m.EvalPerplexity(cmd.Context(), windows, bar.Set)
	bar.Finish()
	if err != nil {
		return err
	}
	if s.flag("json") {
		return json.NewEncoder(cmd.OutOrStdout()).Encode(res)
	}
	fmt.Fprintf(cmd.OutOrStdout(), "perplexity %.4f  (mean NLL %.5f nats over %d predictions in %d windows of %d tokens)\n",
		res.PPL, res.NLL, res.Tokens, res.Windows, s.num("seq-len"))
	return nil
}

// loadModel loads a whole model, requiring the path.
func loadModel(path string, opts ...model.LoadOption) (*model.Model, error) {
	if path == "" {
		return nil, errors.New("--model is required")
	}
	return model.Load(path, opts...)
}

// loadStream reads a data file as one token stream, using the model's tokenizer for text.
func loadStream(modelPath, dataPath string, vocab int) ([]int, error) {
	if dataPath == "" {
		return nil, errors.New("a data file is required")
	}
	tok, err := model.LoadTokenizer(modelPath, vocab)
	if err != nil && !errors.Is(err, model.ErrNoTokenizer) {
		return nil, err
	}
	return model.ReadTokenStream(dataPath, tok, vocab)
}

// loadWindows reads a data file and cuts it into windows of seqLen tokens (at most max, 0: all).
func loadWindows(modelPath, dataPath string, vocab, seqLen, max int) ([][]int, error) {
	if seqLen < 2 {
		return nil, fmt.Errorf("--seq-len %d: a window needs at least 2 tokens", seqLen)
	}
	if max < 0 {
		return nil, fmt.Errorf("--max-windows %d must be ≥ 0", max)
	}
	stream, err := loadStream(modelPath, dataPath, vocab)
	if err != nil {
		return nil, err
	}
	w := model.Windows(stream, seqLen, max)
	if len(w) == 0 {
		return nil, fmt.Errorf("%s: %d tokens is shorter than one window of %d", dataPath, len(stream), seqLen)
	}
	return w, nil
}
