package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"linearpatch/model"
)

func newEvalCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "eval --model PATH (--data FILE | --tasks FILE.jsonl [more task files])",
		Short: "Perplexity of a model on a data file, and zero-shot multiple-choice accuracy",
		Long: `Perplexity: the data file (text, JSON Lines with input_ids, Parquet, or Arrow IPC in the
file or stream format — the Hugging Face datasets cache — with --text-column or an input_ids
list column) becomes one token stream by --protocol:

  lines  every non-blank line (or row) is one document: the document start (BOS) followed
         by its tokens; documents concatenated (the default)
  join   the paper's WikiText-2 protocol: a text file taken whole as one string (newlines
         kept), a text column as "\n\n".join(all rows, blank ones included); encoded once,
         one document start in front (at most 256 MB)

The stream is cut into consecutive non-overlapping windows of --seq-len tokens (the
remainder dropped), each window run from position 0; the perplexity is exp of the mean
next-token negative log-likelihood over all seq-len−1 predictions of every window.

Zero-shot accuracy (--tasks): each task file is JSON Lines of {"context", "choices",
"label"} (or {"contexts", "continuation", "label"} for partial scoring). A choice scores
the sum of log p of its continuation tokens after the document start and the context;
acc takes the best score, acc_norm the best score per UTF-8 byte of the choice (ties to
the first). See README, "Zero-shot accuracy".`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 && !cmd.Flags().Changed("tasks") {
				return fmt.Errorf("unexpected arguments %q (more task files follow --tasks)", args)
			}
			return nil
		},
		RunE: runEval,
	}
	f := cmd.Flags()
	f.String("model", "", "model: a Hugging Face directory or a llama2.c .bin file (required)")
	f.String("data", "", "evaluation data: text, JSON Lines with input_ids, Parquet or Arrow IPC")
	f.Int("seq-len", 256, "tokens per window")
	f.Int("max-windows", 0, "evaluate only the first N windows (0: all)")
	f.StringSlice("tasks", nil, "multiple-choice task files (JSON Lines; comma-separated or repeated; more may follow as arguments)")
	addDataFlags(cmd, true)
	f.Bool("json", false, "print the result as one JSON object on the last line of stdout")
	return cmd
}

// addDataFlags declares how data files are read: --text-column and, when withProtocol,
// the evaluation data's --protocol.
func addDataFlags(cmd *cobra.Command, withProtocol bool) {
	f := cmd.Flags()
	f.String("text-column", model.DefaultTextColumn, "Parquet/Arrow data: the string column read as text (without it, an input_ids integer-list column is read as tokens)")
	if withProtocol {
		f.String("protocol", string(model.ProtocolLines), "evaluation data's perplexity protocol: lines (one document per non-blank line) or join (the whole text as one string, the paper's)")
	}
}

// dataSpec is how a data file is read.
type dataSpec struct {
	protocol   model.Protocol
	textColumn string
}

// evalDataSpec reads --protocol (when the command has it) and --text-column.
func evalDataSpec(s settings) (dataSpec, error) {
	p, err := model.ParseProtocol(s.str("protocol"))
	if err != nil {
		return dataSpec{}, fmt.Errorf("--protocol: %w", err)
	}
	col := s.str("text-column")
	if col == "" {
		return dataSpec{}, errors.New("--text-column must not be empty")
	}
	return dataSpec{protocol: p, textColumn: col}, nil
}

// lines is the spec of calibration and training data: always the lines protocol.
func (d dataSpec) lines() dataSpec {
	return dataSpec{protocol: model.ProtocolLines, textColumn: d.textColumn}
}

// evalJSON is eval's JSON output: the perplexity fields (with --data) and the tasks' (with
// --tasks) inline.
type evalJSON struct {
	*model.Perplexity
	Protocol     model.Protocol `json:"protocol,omitempty"`
	Data         string         `json:"data,omitempty"`
	SeqLen       int            `json:"seq_len,omitempty"`
	StreamTokens int            `json:"stream_tokens,omitempty"` // tokens read before the cut into windows
	*model.TasksResult
}

func runEval(cmd *cobra.Command, args []string) error {
	s, err := resolve(cmd)
	if err != nil {
		return err
	}
	ds, err := evalDataSpec(s)
	if err != nil {
		return err
	}
	taskFiles := append(s.list("tasks"), args...)
	if s.str("data") == "" && len(taskFiles) == 0 {
		return errors.New("--data or --tasks is required")
	}
	ctx := cmd.Context()
	m, err := loadModel(cmd.Context(), s.str("model"))
	if err != nil {
		return err
	}
	tasks, err := loadTasks(s.str("model"), taskFiles, m.Vocab, m.Config.MaxSeq)
	if err != nil {
		return err
	}
	var out evalJSON
	if s.str("data") != "" {
		seqLen := s.num("seq-len")
		windows, streamLen, err := loadWindowsN(ctx, s.str("model"), s.str("data"), m.Vocab, seqLen, s.num("max-windows"), ds)
		if err != nil {
			return err
		}
		bar := newProgress("eval", "windows", len(windows))
		res, err := m.EvalPerplexity(ctx, windows, bar.Set)
		bar.Finish()
		if err != nil {
			return err
		}
		out.Perplexity, out.Protocol, out.Data, out.SeqLen, out.StreamTokens = &res, ds.protocol, s.str("data"), seqLen, streamLen
	}
	if len(tasks) > 0 {
		bar := newProgress("tasks", "batches", model.TaskBatches(tasks, m.Vocab))
		res, err := m.EvalTasks(ctx, tasks, bar.Set)
		bar.Finish()
		if err != nil {
			return err
		}
		out.TasksResult = &res
	}
	if s.flag("json") {
		return json.NewEncoder(cmd.OutOrStdout()).Encode(out)
	}
	printEval(cmd.OutOrStdout(), out)
	return nil
}

func printEval(w io.Writer, out evalJSON) {
	if r := out.Perplexity; r != nil {
		fmt.Fprintf(w, "perplexity %.4f  (%s protocol; mean NLL %.5f nats over %d predictions in %d windows of %d tokens)\n",
			r.PPL, out.Protocol, r.NLL, r.Tokens, r.Windows, out.SeqLen)
	}
	if t := out.TasksResult; t != nil {
		fmt.Fprintln(w, "\n| task | items | acc | acc_norm |")
		fmt.Fprintln(w, "|---|---:|---:|---:|")
		for _, r := range t.Tasks {
			fmt.Fprintf(w, "| %s | %d | %.2f%% | %.2f%% |\n", r.Task, r.Items, 100*r.Acc, 100*r.AccNorm)
		}
		fmt.Fprintf(w, "| mean | | %.2f%% | %.2f%% |\n", 100*t.MeanAcc, 100*t.MeanAccNorm)
	}
}

// loadModel loads a whole model, requiring the path.
func loadModel(ctx context.Context, path string, opts ...model.LoadOption) (*model.Model, error) {
	if path == "" {
		return nil, errors.New("--model is required")
	}
	return model.LoadContext(ctx, path, opts...)
}

// loadTokenizer loads the model's tokenizer; nil without error when it has none.
func loadTokenizer(modelPath string, vocab int) (model.Tokenizer, error) {
	tok, err := model.LoadTokenizer(modelPath, vocab)
	if err != nil && !errors.Is(err, model.ErrNoTokenizer) {
		return nil, err
	}
	return tok, nil
}

// loadTasks loads the multiple-choice task files with the model's tokenizer (nil for none).
func loadTasks(modelPath string, paths []string, vocab, maxSeq int) ([]*model.Task, error) {
	if len(paths) == 0 {
		return nil, nil
	}
	tok, err := model.LoadTokenizer(modelPath, vocab)
	if err != nil {
		return nil, err
	}
	return model.LoadTasks(paths, tok, vocab, maxSeq)
}

// loadStream reads a data file as one token stream, using the model's tokenizer for text;
// maxTokens > 0 stops reading once that many tokens are held (lines protocol).
func loadStream(ctx context.Context, modelPath, dataPath string, vocab int, ds dataSpec, maxTokens int) ([]int, error) {
	if dataPath == "" {
		return nil, errors.New("a data file is required")
	}
	tok, err := loadTokenizer(modelPath, vocab)
	if err != nil {
		return nil, err
	}
	return model.ReadTokens(ctx, dataPath, tok, vocab, model.DataOptions{Protocol: ds.protocol, TextColumn: ds.textColumn, MaxTokens: maxTokens})
}

// loadWindows reads a data file and cuts it into windows of seqLen tokens (at most max, 0:
// all), reading no more of the file than those windows need.
func loadWindows(ctx context.Context, modelPath, dataPath string, vocab, seqLen, max int, ds dataSpec) ([][]int, error) {
	w, _, err := loadWindowsN(ctx, modelPath, dataPath, vocab, seqLen, max, ds)
	return w, err
}

// loadWindowsN is loadWindows that also returns the number of tokens read.
func loadWindowsN(ctx context.Context, modelPath, dataPath string, vocab, seqLen, max int, ds dataSpec) ([][]int, int, error) {
	if seqLen < 2 {
		return nil, 0, fmt.Errorf("--seq-len %d: a window needs at least 2 tokens", seqLen)
	}
	if max < 0 {
		return nil, 0, fmt.Errorf("--max-windows %d must be ≥ 0", max)
	}
	stream, err := loadStream(ctx, modelPath, dataPath, vocab, ds, max*seqLen)
	if err != nil {
		return nil, 0, err
	}
	w := model.Windows(stream, seqLen, max)
	if len(w) == 0 {
		return nil, 0, fmt.Errorf("%s: %d tokens is shorter than one window of %d", dataPath, len(stream), seqLen)
	}
	return w, len(stream), nil
}
