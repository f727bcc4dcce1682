package shards

import (
	"errors"
	"math/rand/v2"
	"testing"
)

// fuzzMeta is the Meta of the fuzz seeds and the decoder's expectation.
var fuzzMeta = testMeta(Float16, 4, 3, 300, true)

func FuzzDecodeMessage(f *testing.F) {
	r := rand.New(rand.NewPCG(40, 40))
	for _, rows := range [][]Chunk{nil, {randWindow(r, fuzzMeta, 0, 1, 2)}, {randWindow(r, fuzzMeta, 1, 2, 1), randWindow(r, fuzzMeta, 1, 3, 3)}} {
		b, err := EncodeMessage(fuzzMeta, rows)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	for _, m := range []Meta{testMeta(BFloat16, 2, 0, 10, false), testMeta(Float32, 3, 2, 70000, false)} {
		b, err := EncodeMessage(m, []Chunk{randWindow(r, m, 0, 0, 2)})
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	stats, err := EncodeStats(statsMeta(4), randStats(r, 2, 4, 1, 1, []int{0}), 1<<20)
	if err != nil {
		f.Fatal(err)
	}
	for _, b := range stats {
		f.Add(b)
	}
	f.Add([]byte{})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		rows, err := DecodeMessage(b, fuzzMeta)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrForeign) && !errors.Is(err, ErrVersion) {
				t.Fatalf("error wraps no sentinel: %v", err)
			}
			return
		}
		// Whatever decodes is well formed: it encodes again.
		if _, err := EncodeMessage(fuzzMeta, rows); err != nil {
			t.Fatalf("decoded rows do not encode: %v", err)
		}
		_, _, _ = MessageMeta(b)
	})
}

func FuzzDecodeStats(f *testing.F) {
	r := rand.New(rand.NewPCG(41, 41))
	m := statsMeta(4)
	msgs, err := EncodeStats(m, randStats(r, 2, 4, 1, 2, []int{0, 1}), HeaderMargin+3000)
	if err != nil {
		f.Fatal(err)
	}
	for _, b := range msgs {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		a := NewStatsAssembler(m)
		if err := a.Add(b); err != nil {
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrForeign) && !errors.Is(err, ErrVersion) {
				t.Fatalf("error wraps no sentinel: %v", err)
			}
			return
		}
		if st, err := a.Stats(); err == nil {
			if err := st.Validate(); err != nil {
				t.Fatalf("assembled statistics invalid: %v", err)
			}
		}
	})
}
