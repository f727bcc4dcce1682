package protocol

import (
	"errors"
	"strings"
	"testing"
)

func testPlan(t *testing.T, calib, train, per int) *Plan {
	t.Helper()
	p, err := NewPlan("rtest", Settings{Model: "m", Fingerprint: "f", Calib: "c", CalibSHA256: "c1", CalibWindows: 128, Train: "t", TrainSHA256: "t1",
		SeqLen: 16, NumPrune: 2, ShardWindows: per, TopK: 50, ValidFrac: 0.05}, calib, train)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestNewPlanSplits(t *testing.T) {
	tests := []struct {
		calib, train, per             int
		statsShards, train_, valid    int
		cacheShards, firstValidWindow int
	}{
		{calib: 200, train: 2643, per: 32, statsShards: 4, train_: 2510, valid: 133, cacheShards: 79 + 5, firstValidWindow: 2510},
		{calib: 10, train: 100, per: 32, statsShards: 1, train_: 95, valid: 5, cacheShards: 3 + 1, firstValidWindow: 95},
		{calib: 1, train: 2, per: 1, statsShards: 1, train_: 1, valid: 1, cacheShards: 2, firstValidWindow: 1},
	}
	for _, tc := range tests {
		p := testPlan(t, tc.calib, tc.train, tc.per)
		if len(p.Stats) != tc.statsShards || p.TrainWindows != tc.train_ || p.ValidWindows != tc.valid || len(p.Cache) != tc.cacheShards {
			t.Errorf("%+v: got %d stats shards, %d train, %d valid windows, %d cache shards", tc, len(p.Stats), p.TrainWindows, p.ValidWindows, len(p.Cache))
		}
		covered := 0
		for i, s := range p.Cache {
			if s.ID != i || s.First != covered {
				t.Errorf("%+v: shard %d = %+v, want id %d first %d", tc, i, s, i, covered)
			}
			if (s.Split == SplitValid) != (s.First >= tc.firstValidWindow) {
				t.Errorf("%+v: shard %+v mixes splits", tc, s)
			}
			covered += s.Windows
		}
		if covered != tc.train {
			t.Errorf("%+v: cache shards cover %d windows, want %d", tc, covered, tc.train)
		}
	}
	if _, err := NewPlan("rtest", Settings{Model: "m", Fingerprint: "f", Calib: "c", CalibSHA256: "c1", CalibWindows: 1, SeqLen: 16, NumPrune: 1, ShardWindows: 1, TopK: 1}, 0, 0); err == nil {
		t.Error("a plan without calibration windows was accepted")
	}
}

func TestRunIDRandom(t *testing.T) {
	seen := map[string]bool{}
	for range 100 {
		id := NewRunID()
		if len(id) != 25 || id[0] != 'r' || seen[id] {
			t.Fatalf("run id %q: want a fresh r + 24 hex digits", id)
		}
		seen[id] = true
	}
}

func TestCheckResume(t *testing.T) {
	base := Settings{Model: "m", Fingerprint: "f", Tokenizer: "tok", Calib: "c", CalibSHA256: "c1", CalibWindows: 4,
		Train: "t", TrainSHA256: "t1", SeqLen: 16, NumPrune: 1, ShardWindows: 1, TopK: 5}
	p, err := NewPlan(NewRunID(), base, 4, 8)
	if err != nil {
		t.Fatal(err)
	}
	moved := base
	moved.Model, moved.Calib, moved.Train = "/elsewhere/m", "/elsewhere/c", "/elsewhere/t"
	if err := p.CheckResume(moved); err != nil {
		t.Errorf("same contents under other paths: %v", err)
	}
	tests := []struct {
		name string
		edit func(*Settings)
		want string
	}{
		{"train contents", func(s *Settings) { s.TrainSHA256 = "t2" }, "train_sha256: t1 → t2"},
		{"calib contents", func(s *Settings) { s.CalibSHA256 = "c2" }, "calib_sha256: c1 → c2"},
		{"tokenizer", func(s *Settings) { s.Tokenizer = "tok2" }, "tokenizer_sha256: tok → tok2"},
		{"model", func(s *Settings) { s.Fingerprint = "g" }, "fingerprint: f → g"},
		{"setting", func(s *Settings) { s.TopK = 7 }, "top_k: 5 → 7"},
		{"no train", func(s *Settings) { s.Train, s.TrainSHA256 = "", "" }, "train_sha256: t1 → (none)"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := base
			tc.edit(&s)
			err := p.CheckResume(s)
			if !errors.Is(err, ErrPlan) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want ErrPlan naming %q", err, tc.want)
			}
		})
	}
	old := *p
	old.Version = 0
	if err := old.CheckResume(base); !errors.Is(err, ErrVersion) || !strings.Contains(err.Error(), "version 1") {
		t.Errorf("a version-1 plan: %v", err)
	}
}
