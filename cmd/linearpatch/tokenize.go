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
		Long: `Tokenize a data file exactly as eval does (every non-blank line one document: BOS followed
by the SentencePiece ids of the line; documents concatenated) and print the whole stream as
one JSON Lines record {"input_ids": [...]}, which eval, prune and run accept as data.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := resolve(cmd)
			if err != nil {
				return err
			}
			cfg, err := model.ReadModelConfig(s.str("model"))
			if err != nil {
				return err
			}
			ids, err := loadStream(s.str("model"), s.str("data"), cfg.Vocab)
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
	cmd.Flags().String("data", "", "text file to tokenize")
	return cmd
}
