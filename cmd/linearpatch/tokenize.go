package main

import (
	"bufio"
	"encoding/json"

	"github.com/spf13/cobra"

	"linearpatch/model"
)

func newTokenizeCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "tokenize --model PATH --data FILE",
		Short: "Print a data file's token stream as one JSON line {\"input_ids\": [...]}",
		Long: `Tokenize a data file exactly as eval does (every non-blank line one document: the
document start (BOS) followed by the tokenizer's ids of the line; documents concatenated) and
print the whole stream as one JSON Lines record {"input_ids": [...]}, which eval, prune and run
accept as data. The model may be a directory with only config.json and the tokenizer files
(tokenizer.json, preferred, with tokenizer_config.json; or tokenizer.model): no weights needed.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := resolve(cmd)
			if err != nil {
				return err
			}
			cfg, err := model.ReadTokenizingConfig(s.str("model")) // no weights, any model_type
			if err != nil {
				return err
			}
			ds, err := evalDataSpec(s)
			if err != nil {
				return err
			}
			ids, err := loadStream(cmd.Context(), s.str("model"), s.str("data"), cfg.Vocab, ds, 0)
			if err != nil {
				return err
			}
			w := bufio.NewWriter(cmd.OutOrStdout())
			if err := json.NewEncoder(w).Encode(struct {
				InputIDs []int `json:"input_ids"`
			}{ids}); err != nil {
				return err
			}
			return w.Flush()
		},
	}
	cmd.Flags().String("model", "", "model whose tokenizer to use (directory with tokenizer.model, or llama2.c .bin with tokenizer.bin beside it)")
	cmd.Flags().String("data", "", "data file to tokenize (text, JSON Lines, Parquet or Arrow IPC)")
	addDataFlags(cmd, true)
	return cmd
}
