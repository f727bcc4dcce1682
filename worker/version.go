package worker

import (
	"errors"
	"fmt"
	"strings"

	"golang.org/x/mod/semver"
)

// ErrServerVersion is matched (errors.Is) by *ServerVersionError: the server is older than
// a JetStream feature the pipeline uses.
var ErrServerVersion = errors.New("worker: nats-server too old")

// serverFeatures are the JetStream features the pipeline uses with the first nats-server
// release that has them, newest last. CheckServerVersion names those a server lacks.
var serverFeatures = []struct{ feature, since string }{
	{"JetStream", "2.2.0"},
	{"the object store", "2.6.2"},
	{"consumers with several filter subjects (the teachers' and the cache writer's)", "2.10.0"},
}

// MinServerVersion is the oldest nats-server release the pipeline runs on.
func MinServerVersion() string { return serverFeatures[len(serverFeatures)-1].since }

// ServerVersionError reports a server older than MinServerVersion.
type ServerVersionError struct {
	Found   string // the version the server announced ("" when it announced none)
	Needed  string // MinServerVersion
	Feature string // the features the server lacks
}

func (e *ServerVersionError) Error() string {
	found := e.Found
	if found == "" {
		found = "an unknown version"
	}
	return fmt.Sprintf("worker: nats-server %s is too old: linearpatch needs %s or newer (for %s)", found, e.Needed, e.Feature)
}

// Is makes errors.Is(err, ErrServerVersion) true.
func (e *ServerVersionError) Is(target error) bool { return target == ErrServerVersion }

// CheckServerVersion returns a *ServerVersionError when version (as a server announces it,
// "2.9.10" or "2.11.0-beta.1") is older than MinServerVersion or not a version at all.
func CheckServerVersion(version string) error {
	v := "v" + strings.TrimPrefix(strings.TrimSpace(version), "v")
	var lacking []string
	for _, f := range serverFeatures {
		if !semver.IsValid(v) || semver.Compare(v, "v"+f.since) < 0 {
			lacking = append(lacking, f.feature)
		}
	}
	if len(lacking) == 0 {
		return nil
	}
	return &ServerVersionError{Found: version, Needed: MinServerVersion(), Feature: strings.Join(lacking, ", ")}
}
