package protocol

import "testing"

func TestParseDoneKey(t *testing.T) {
	for _, ph := range []Phase{PhaseStats, PhaseCache} {
		for _, id := range []int{0, 7, 123456, 1234567} {
			got, gotID, ok := ParseDoneKey(DoneKey(ph, id))
			if !ok || got != ph || gotID != id {
				t.Fatalf("ParseDoneKey(%q) = %s, %d, %v", DoneKey(ph, id), got, gotID, ok)
			}
		}
	}
	for _, k := range []string{"plan", "shard.cache.000001", "done.cache", "done.cache.x", "done.cache.-1", TeacherKey("t1")} {
		if _, _, ok := ParseDoneKey(k); ok {
			t.Fatalf("ParseDoneKey(%q) accepted", k)
		}
	}
}
