package studentnet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"sort"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Report is one student's report under students.live.<holder>, refreshed every lease/3
// while it runs; status reads them.
type Report struct {
	Holder       string    `json:"holder"`
	Host         string    `json:"host"`
	PID          int       `json:"pid"`
	State        string    `json:"state"`
	Step         int       `json:"step"`
	TotalSteps   int       `json:"total_steps"`
	Loss         float64   `json:"loss"` // the last step's (0 before any)
	TokensPerSec float64   `json:"tokens_per_s"`
	ETASeconds   float64   `json:"eta_s"`
	Windows      int       `json:"windows"` // windows this student computed
	Lease        float64   `json:"lease_s"`
	Updated      time.Time `json:"updated"`
}

// Live reports whether r was refreshed within three of its leases before now. It compares
// the reporter's clock with the reader's, so it is for display only (claims never use it).
func (r Report) Live(now time.Time) bool {
	return now.Sub(r.Updated) < 3*time.Duration(r.Lease*float64(time.Second))
}

var badKey = regexp.MustCompile(`[^A-Za-z0-9_-]`)

// HolderKey turns a holder name into a KV key token.
func HolderKey(holder string) string { return badKey.ReplaceAllString(holder, "_") }

// PutReport stores r under students.live.<holder>.
func PutReport(ctx context.Context, kv jetstream.KeyValue, r Report) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	_, err = kv.Put(ctx, KeyLivePrefix+HolderKey(r.Holder), b)
	return err
}

// Reports returns the students' reports in the run's bucket, by holder.
func Reports(ctx context.Context, kv jetstream.KeyValue) ([]Report, error) {
	lister, err := kv.ListKeysFiltered(ctx, KeyLivePrefix+">")
	if err != nil {
		return nil, err
	}
	var out []Report
	for k := range lister.Keys() {
		e, err := kv.Get(ctx, k)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		var r Report
		if err := json.Unmarshal(e.Value(), &r); err != nil {
			return nil, fmt.Errorf("studentnet: %s: %w", k, err)
		}
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Holder < out[j].Holder })
	return out, nil
}
