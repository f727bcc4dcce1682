package protocol

import (
	"encoding/json"
	"math"
	"testing"
)

// TestFloatJSON: NaN and ±Inf travel as null and come back as NaN; numbers are exact.
func TestFloatJSON(t *testing.T) {
	in := StudentStatus{Loss: Float(0.1234567890123), ValidLoss: Float(math.NaN())}
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	var out StudentStatus
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	if out.Loss != in.Loss || !math.IsNaN(float64(out.ValidLoss)) {
		t.Fatalf("round trip of %s: loss %v, valid %v", b, out.Loss, out.ValidLoss)
	}
	if b, err := json.Marshal(Float(math.Inf(1))); err != nil || string(b) != "null" {
		t.Fatalf("+Inf: %s, %v", b, err)
	}
	var f Float
	if err := json.Unmarshal([]byte(`"x"`), &f); err == nil {
		t.Fatal("a string decoded as a Float")
	}
}
