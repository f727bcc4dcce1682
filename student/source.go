package student

import "context"

// ShardSource is where a ShardData's shard files come from. ShardData always reads a
// planned shard from its cache directory (manifest.json and the shard file, checked against
// the manifest's SHA-256); a source puts them there first.
//
//   - Files already in the directory (a run directory whose cache writer works beside the
//     student) need no source: the manifest is read, or polled with WithManifestPoll.
//   - A student elsewhere (`linearpatch student --nats`) uses a source that fetches each
//     shard from the run and writes it, with its manifest entry, into the student's own
//     directory.
//
// Ensure returns nil once shard's file is complete and listed in the directory's manifest,
// or an error (ctx.Err() when ctx ends). ShardData may call it from its background loader
// for the shard after the one in use, concurrently with the caller's own call for another
// shard: it must be safe for concurrent use.
type ShardSource interface {
	Ensure(ctx context.Context, shard int) error
}

// WithSource makes every shard load first call src.Ensure (see ShardSource).
func WithSource(src ShardSource) DataOption {
	if src == nil {
		return WithWaitFor(nil) // the option's error
	}
	return WithWaitFor(src.Ensure)
}
