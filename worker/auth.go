package worker

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"linearpatch/internal/atomicfile"
)

// ErrCredentials is wrapped by errors about a run's credentials.
var ErrCredentials = errors.New("worker: credentials")

// Role is what one client of a run's NATS may do. The server enforces it with subject
// permissions (see Names.Permissions), so a process holding one role's key cannot act as
// another.
type Role string

const (
	// RoleCoordinator owns the run: it creates its streams, bucket and object store,
	// publishes tasks and writes the plan and the fit. It has no restriction.
	RoleCoordinator Role = "coordinator"
	// RoleTeacher pulls and acks its tasks and publishes data records, their done
	// markers, dead letters and progress reports. It writes no key, no object, no task.
	RoleTeacher Role = "teacher"
	// RoleCache is the cache writer: it consumes and acks the data stream and alone writes
	// the cache shards' done records (KV "done.cache.*") and its lease ("writer.*"); it asks
	// for a shard whose record it rejected to be recomputed ("redo.cache.*").
	RoleCache Role = "cache"
	// RoleStudent alone writes the student's checkpoint object.
	RoleStudent Role = "student"
	// RoleStatus only reads.
	RoleStatus Role = "status"
)

// FileRoles are the roles whose keys a coordinator with an embedded server writes into the
// run directory for processes on other machines (the coordinator's own key never leaves
// its process).
var FileRoles = []Role{RoleTeacher, RoleCache, RoleStudent, RoleStatus}

// What RoleStudent alone may write: its checkpoint and the distilled patch in the run's
// object store, its progress and its result in the run's bucket (the names of
// protocol.ObjStudentCheckpoint, ObjPatchKD, KeyStudent and KeyStudentResult, which
// TestStudentNamesAgree keeps equal).
const (
	StudentCheckpointObject = "student.checkpoint"
	StudentPatchObject      = "patch.kd"
	StudentStatusKey        = "student"
	StudentResultKey        = "student.result"
	// StudentsKeyPrefix starts the keys of the students that share the steps (claims,
	// checkpoint pointer, per-student reports).
	StudentsKeyPrefix = "students."
)

// CoordinatorObjects are the objects only the coordinator writes in the run's object store
// (protocol.ObjCalibTokens, ObjTrainTokens, ObjPatch0; TestStudentNamesAgree keeps them
// equal).
var CoordinatorObjects = []string{"tokens.calib", "tokens.train", "patch0"}

// PublisherHeader names, on every data message a teacher publishes, the teacher that says
// it published it. Nothing checks the claim (any holder of the teacher role can write any
// name): it is for the logs of whoever rejects or skips the message.
const PublisherHeader = "Linearpatch-Publisher"

// ClaimedPublisher returns what a message says about its publisher: its PublisherHeader,
// or "(none)".
func ClaimedPublisher(h nats.Header) string {
	if v := h.Get(PublisherHeader); v != "" {
		return v
	}
	return "(none)"
}

// ParseRole returns the role named s.
func ParseRole(s string) (Role, error) {
	r := Role(s)
	if r == RoleCoordinator || slices.Contains(FileRoles, r) {
		return r, nil
	}
	return "", fmt.Errorf("%w: unknown role %q (want coordinator, teacher, cache, student or status)", ErrInvalidOption, s)
}

// Permissions returns the subject permissions of role r on run n's NATS: nil (everything)
// for RoleCoordinator. Only publishing is restricted (requests to the JetStream API and
// KV and object writes are publishes); every role may subscribe, for its replies and its
// consumers' deliveries.
func (n Names) Permissions(r Role) *server.Permissions { return permissions(r, n.run) }

// AnyRunPermissions is Permissions for a server shared by many runs (deploy/nats/auth.conf):
// the run's stream and bucket names become wildcards, so a role may act the same way on
// every run of its account.
func AnyRunPermissions(r Role) *server.Permissions { return permissions(r, "*") }

func permissions(r Role, run string) *server.Permissions {
	if r == RoleCoordinator {
		return nil
	}
	stream := func(name string) string {
		if run == "*" {
			return "*"
		}
		return name
	}
	n := Names{run: run}
	tasks, data, dead := stream(n.TasksStream()), stream(n.DataStream()), stream(n.DeadStream())
	kvStream, objStream, gradStream := stream("KV_"+n.KVBucket()), stream("OBJ_"+n.ObjectStore()), stream("OBJ_"+n.GradStore())
	kvPre, objPre := "$KV."+stream(n.KVBucket())+".", "$O."+stream(n.ObjectStore())+"."

	var allow []string
	add := func(s ...string) {
		for _, x := range s {
			if !slices.Contains(allow, x) {
				allow = append(allow, x)
			}
		}
	}
	// Everyone reads: stream and consumer info, single messages, KV gets.
	add("$JS.API.INFO")
	for _, s := range []string{tasks, data, dead, kvStream, objStream, gradStream} {
		add("$JS.API.STREAM.INFO."+s, "$JS.API.STREAM.MSG.GET."+s, "$JS.API.DIRECT.GET."+s, "$JS.API.DIRECT.GET."+s+".>",
			"$JS.API.CONSUMER.INFO."+s+".*")
	}
	// consume lets a role read a stream through consumers: its durable ones and the
	// ordered ones behind KV watches and object gets (created, pulled, flow-controlled and
	// deleted by the client).
	consume := func(del bool, streams ...string) {
		for _, s := range streams {
			add("$JS.API.CONSUMER.CREATE."+s, "$JS.API.CONSUMER.CREATE."+s+".>", "$JS.API.CONSUMER.DURABLE.CREATE."+s+".>",
				"$JS.API.CONSUMER.MSG.NEXT."+s+".>", "$JS.FC."+s+".>")
			if del {
				add("$JS.API.CONSUMER.DELETE." + s + ".>")
			}
		}
	}
	switch r {
	case RoleTeacher:
		consume(false, tasks) // the shared durable task consumer: never deleted by a teacher
		consume(true, kvStream, objStream)
		add("$JS.ACK."+tasks+".>", "lp."+run+".data.>", "lp."+run+".progress", "lp."+run+".dead")
	case RoleCache:
		consume(true, data, kvStream)
		add("$JS.ACK."+data+".>", kvPre+"done.cache.*", kvPre+"writer.>", kvPre+"redo.cache.*")
	case RoleStudent:
		consume(true, kvStream, objStream, data, gradStream) // data: ordered consumers that rebuild shards
		add(objPre+"C.>", objPre+"M."+base64.URLEncoding.EncodeToString([]byte(StudentCheckpointObject)),
			objPre+"M."+base64.URLEncoding.EncodeToString([]byte(StudentPatchObject)),
			kvPre+StudentStatusKey, kvPre+StudentResultKey,
			"$JS.API.STREAM.PURGE."+objStream) // replacing an object purges its old chunks
		// Sharing steps: the claims, checkpoint pointer and reports under "students." in
		// the bucket, and any object of the gradient store (gradients, checkpoints).
		add(kvPre+StudentsKeyPrefix+">", "$O."+stream(n.GradStore())+".>", "$JS.API.STREAM.PURGE."+gradStream)
	case RoleStatus:
		consume(true, kvStream)
	}
	perm := &server.Permissions{Publish: &server.SubjectPermission{Allow: allow}}
	if run == "*" {
		// On a shared server stream names are wildcards, so keep each role off the other's
		// durable consumer: the teachers' task consumer ("teachers", protocol.TeacherConsumer)
		// and the cache writer's data consumer ("cache-writer").
		steal := func(consumer string) []string {
			return []string{"$JS.API.CONSUMER.MSG.NEXT.*." + consumer, "$JS.ACK.*." + consumer + ".>",
				"$JS.API.CONSUMER.DELETE.*." + consumer, "$JS.API.CONSUMER.CREATE.*." + consumer + ".>",
				"$JS.API.CONSUMER.CREATE.*." + consumer, "$JS.API.CONSUMER.DURABLE.CREATE.*." + consumer}
		}
		switch r {
		case RoleTeacher:
			perm.Publish.Deny = append(steal("cache-writer"), "$JS.API.CONSUMER.DELETE.*.teachers")
		case RoleCache:
			perm.Publish.Deny = steal("teachers")
		default:
			perm.Publish.Deny = append(steal("teachers"), steal("cache-writer")...)
		}
		if r == RoleStudent {
			// "$O.*.>" (the gradient store's objects) matches the run's object store too:
			// keep the student off the coordinator's objects there.
			for _, o := range CoordinatorObjects {
				perm.Publish.Deny = append(perm.Publish.Deny, "$O.*.M."+base64.URLEncoding.EncodeToString([]byte(o)))
			}
		}
	}
	return perm
}

// Credentials are the nkey pairs of a run's roles, as a coordinator with an embedded server
// holds them. The server knows only their public keys.
type Credentials struct {
	keys map[Role]nkeys.KeyPair
}

// CredsFile is the name of a role's nkey seed file in a credentials directory.
func CredsFile(dir string, r Role) string { return filepath.Join(dir, string(r)+".nk") }

// LoadOrCreateCredentials reads the role keys in dir (0700), creating dir and any missing
// FileRoles key (one seed file per role, 0600), so a restarted coordinator keeps the keys
// already handed out. The coordinator's key is new on every call and never written.
func LoadOrCreateCredentials(dir string) (*Credentials, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCredentials, err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCredentials, err)
	}
	c := &Credentials{keys: map[Role]nkeys.KeyPair{}}
	kp, err := nkeys.CreateUser()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCredentials, err)
	}
	c.keys[RoleCoordinator] = kp
	for _, r := range FileRoles {
		path := CredsFile(dir, r)
		b, err := os.ReadFile(path)
		switch {
		case err == nil:
			kp, err := nkeys.ParseDecoratedNKey(b)
			if err != nil {
				return nil, fmt.Errorf("%w: %s holds no nkey seed", ErrCredentials, path)
			}
			if pub, err := kp.PublicKey(); err != nil || !nkeys.IsValidPublicUserKey(pub) {
				return nil, fmt.Errorf("%w: %s is not a user nkey seed", ErrCredentials, path)
			}
			c.keys[r] = kp
		case errors.Is(err, os.ErrNotExist):
			kp, err := nkeys.CreateUser()
			if err != nil {
				return nil, fmt.Errorf("%w: %w", ErrCredentials, err)
			}
			seed, err := kp.Seed()
			if err != nil {
				return nil, fmt.Errorf("%w: %w", ErrCredentials, err)
			}
			if err := atomicfile.Write(path, append(seed, '\n'), 0o600); err != nil {
				return nil, fmt.Errorf("%w: %w", ErrCredentials, err)
			}
			c.keys[r] = kp
		default:
			return nil, fmt.Errorf("%w: %w", ErrCredentials, err)
		}
	}
	return c, nil
}

// users returns the server's nkey users: one per role, with the role's permissions on run n.
func (c *Credentials) users(n Names) ([]*server.NkeyUser, error) {
	var out []*server.NkeyUser
	for _, r := range append([]Role{RoleCoordinator}, FileRoles...) {
		pub, err := c.keys[r].PublicKey()
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrCredentials, err)
		}
		out = append(out, &server.NkeyUser{Nkey: pub, Permissions: n.Permissions(r)})
	}
	return out, nil
}

// option returns the nats.go option that logs in as role r.
func (c *Credentials) option(r Role) (nats.Option, error) {
	kp, ok := c.keys[r]
	if !ok {
		return nil, fmt.Errorf("%w: no key for role %s", ErrCredentials, r)
	}
	pub, err := kp.PublicKey()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCredentials, err)
	}
	return nats.Nkey(pub, kp.Sign), nil
}

// WithRoles makes the server require authentication: only the holders of creds' keys may
// connect, each with its role's permissions on run n.
func WithRoles(creds *Credentials, n Names) ServerOption {
	return func(o *serverOptions) error {
		if creds == nil {
			return fmt.Errorf("%w: nil credentials", ErrInvalidOption)
		}
		if _, err := NewNames(n.run); err != nil {
			return err
		}
		users, err := creds.users(n)
		if err != nil {
			return err
		}
		o.nkeys = users
		return nil
	}
}

// ConnectInProcess connects to e inside this process (no socket, no TLS) as role r, with the
// reconnect and logging behavior of Connect. e must have been started WithRoles(creds, …).
func ConnectInProcess(ctx context.Context, e *Embedded, creds *Credentials, r Role, o ConnOptions) (*nats.Conn, error) {
	o.URL = e.inProcURL
	if err := o.Validate(); err != nil {
		return nil, err
	}
	if o.User != "" || o.Token != "" || o.NKeyFile != "" || o.CredsFile != "" {
		return nil, fmt.Errorf("%w: an in-process connection logs in with its role's key only", ErrInvalidOption)
	}
	opts, err := o.natsOptions()
	if err != nil {
		return nil, err
	}
	login, err := creds.option(r)
	if err != nil {
		return nil, err
	}
	opts = append(opts, login, nats.InProcessServer(e.srv))
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	nc, err := nats.Connect(o.URL, opts...)
	if err != nil {
		return nil, fmt.Errorf("worker: connect in process as %s: %w", r, err)
	}
	return nc, nil
}

// isLoopback reports whether a listen host reaches only this machine.
func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
