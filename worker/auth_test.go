package worker

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// roleServer starts an embedded server that requires the run's role keys and sets up
// run "rauth" as its coordinator (in process). It returns the server, the credentials
// directory and the coordinator's JetStream.
func roleServer(t *testing.T) (*Embedded, string, Names, jetstream.JetStream) {
	t.Helper()
	names, err := NewNames("rauth")
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "creds")
	creds, err := LoadOrCreateCredentials(dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	e, err := StartEmbedded(ctx, t.TempDir(), WithServerLogger(testLogger()), WithRoles(creds, names))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Shutdown)
	nc, err := ConnectInProcess(ctx, e, creds, RoleCoordinator, ConnOptions{Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	if err := Setup(ctx, js, names, StreamConfig{}); err != nil {
		t.Fatal(err)
	}
	return e, dir, names, js
}

func TestCredentialsFiles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "creds")
	if _, err := LoadOrCreateCredentials(dir); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(dir)
	if err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("credentials directory: %v %v", st.Mode(), err)
	}
	seeds := map[Role][]byte{}
	for _, r := range FileRoles {
		st, err := os.Stat(CredsFile(dir, r))
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Fatalf("%s: mode %v, %v", CredsFile(dir, r), st.Mode(), err)
		}
		seeds[r], _ = os.ReadFile(CredsFile(dir, r))
		if !bytes.HasPrefix(seeds[r], []byte("SU")) {
			t.Fatalf("%s holds no user seed", CredsFile(dir, r))
		}
	}
	// A restarted coordinator keeps the keys it handed out.
	if _, err := LoadOrCreateCredentials(dir); err != nil {
		t.Fatal(err)
	}
	for _, r := range FileRoles {
		if b, _ := os.ReadFile(CredsFile(dir, r)); !bytes.Equal(b, seeds[r]) {
			t.Errorf("%s changed on reload", r)
		}
	}
	if err := os.WriteFile(CredsFile(dir, RoleTeacher), []byte("not a seed"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadOrCreateCredentials(dir); !errors.Is(err, ErrCredentials) || strings.Contains(err.Error(), "not a seed") {
		t.Errorf("a broken seed file: %v", err)
	}
}

// TestRolePermissions: on a server started WithRoles, anonymous clients are refused and
// each role's forbidden publishes are refused (nothing stored), while what the role needs
// works.
func TestRolePermissions(t *testing.T) {
	e, dir, names, admin := roleServer(t)
	ctx := t.Context()

	if nc, err := nats.Connect(e.URL(), nats.Timeout(2*time.Second)); err == nil {
		nc.Close()
		t.Fatal("an anonymous client connected")
	} else if !errors.Is(err, nats.ErrAuthorization) {
		t.Fatalf("anonymous connect: %v, want an authorization error", err)
	}

	adminKV, err := admin.KeyValue(ctx, names.KVBucket())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := adminKV.Put(ctx, "plan", []byte("{}")); err != nil {
		t.Fatal(err)
	}
	as := func(r Role) (jetstream.JetStream, jetstream.KeyValue, jetstream.ObjectStore) {
		nc, err := Connect(ctx, ConnOptions{URL: e.URL(), NKeyFile: CredsFile(dir, r), Logger: testLogger()})
		if err != nil {
			t.Fatalf("%s: %v", r, err)
		}
		t.Cleanup(nc.Close)
		js, err := jetstream.New(nc)
		if err != nil {
			t.Fatal(err)
		}
		kv, err := js.KeyValue(ctx, names.KVBucket())
		if err != nil {
			t.Fatalf("%s reads the bucket: %v", r, err)
		}
		obj, err := js.ObjectStore(ctx, names.ObjectStore())
		if err != nil {
			t.Fatalf("%s reads the object store: %v", r, err)
		}
		return js, kv, obj
	}
	short := func() (context.Context, context.CancelFunc) { return context.WithTimeout(ctx, time.Second) }
	adminObj, err := admin.ObjectStore(ctx, names.ObjectStore())
	if err != nil {
		t.Fatal(err)
	}
	count := func(stream string) uint64 {
		s, err := admin.Stream(ctx, stream)
		if err != nil {
			t.Fatal(err)
		}
		return s.CachedInfo().State.Msgs
	}
	// stored counts the messages that make up records: tasks, data, keys and objects (a
	// chunk without its object's metadata is no object: chunk subjects carry no name).
	stored := func() uint64 {
		n := count(names.TasksStream()) + count(names.DataStream()) + count("KV_"+names.KVBucket())
		for _, name := range []string{StudentCheckpointObject, "patch0", "tokens.train"} {
			if _, err := adminObj.GetInfo(ctx, name); err == nil {
				n += 1 << 20
			}
		}
		return n
	}
	type op struct {
		name    string
		allowed bool
		do      func(ctx context.Context, js jetstream.JetStream, kv jetstream.KeyValue, obj jetstream.ObjectStore) error
	}
	pub := func(subject string) func(context.Context, jetstream.JetStream, jetstream.KeyValue, jetstream.ObjectStore) error {
		return func(ctx context.Context, js jetstream.JetStream, _ jetstream.KeyValue, _ jetstream.ObjectStore) error {
			_, err := js.Publish(ctx, subject, []byte("x"))
			return err
		}
	}
	put := func(key string) func(context.Context, jetstream.JetStream, jetstream.KeyValue, jetstream.ObjectStore) error {
		return func(ctx context.Context, _ jetstream.JetStream, kv jetstream.KeyValue, _ jetstream.ObjectStore) error {
			_, err := kv.Put(ctx, key, []byte(`{"evil": true}`))
			return err
		}
	}
	object := func(name string) func(context.Context, jetstream.JetStream, jetstream.KeyValue, jetstream.ObjectStore) error {
		return func(ctx context.Context, _ jetstream.JetStream, _ jetstream.KeyValue, obj jetstream.ObjectStore) error {
			_, err := obj.PutBytes(ctx, name, []byte("junk"))
			return err
		}
	}
	task, data, done := names.TaskSubject("cache"), names.DataSubject("cache", 0, 0, 0), names.DoneSubject("cache", 0)
	roles := map[Role][]op{
		RoleTeacher: {
			{"publish a record", true, pub(data)},
			{"publish a done marker", true, pub(done)},
			{"publish a task", false, pub(task)},
			{"write a shard done record", false, put("done.cache.000000")},
			{"write the plan", false, put("plan")},
			{"write the fit", false, put("fit")},
			{"write a checkpoint", false, object(StudentCheckpointObject)},
			{"write the patch", false, object("patch0")},
		},
		RoleCache: {
			{"write a shard done record", true, put("done.cache.000001")},
			{"write its lease", true, put("writer.cache")},
			{"write a stats done record", false, put("done.stats.000000")},
			{"write the plan", false, put("plan")},
			{"publish a record", false, pub(data)},
			{"publish a task", false, pub(task)},
			{"write a checkpoint", false, object(StudentCheckpointObject)},
		},
		RoleStudent: {
			{"write its checkpoint", true, object(StudentCheckpointObject)},
			{"write the patch", false, object("patch0")},
			{"write the token stream", false, object("tokens.train")},
			{"write a shard done record", false, put("done.cache.000002")},
			{"publish a record", false, pub(data)},
			{"publish a task", false, pub(task)},
		},
		RoleStatus: {
			{"write the status", false, put("status")},
			{"write a shard done record", false, put("done.cache.000003")},
			{"publish a record", false, pub(data)},
			{"publish a task", false, pub(task)},
			{"write a checkpoint", false, object(StudentCheckpointObject)},
		},
	}
	for _, r := range FileRoles {
		js, kv, obj := as(r)
		// Every role reads the plan.
		if e, err := kv.Get(ctx, "plan"); err != nil || string(e.Value()) != "{}" {
			t.Errorf("%s cannot read the plan: %v", r, err)
		}
		for _, o := range roles[r] {
			t.Run(string(r)+"/"+o.name, func(t *testing.T) {
				before := stored()
				c, cancel := short()
				err := o.do(c, js, kv, obj)
				cancel()
				after := stored()
				if o.allowed && (err != nil || after == before) {
					t.Errorf("refused: %v (messages %d → %d)", err, before, after)
				}
				if !o.allowed && (err == nil || after != before) {
					t.Errorf("allowed: err %v, messages %d → %d", err, before, after)
				}
			})
		}
	}
	if p := names.Permissions(RoleCoordinator); p != nil {
		t.Errorf("the coordinator is restricted: %+v", p)
	}
}

// selfSigned writes a self-signed certificate for 127.0.0.1 and its key into dir.
func selfSigned(t *testing.T, dir string) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "linearpatch test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "server.crt"), filepath.Join(dir, "server.key")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

// TestEmbeddedTLS: WithTLS serves TLS on every interface (allowed beyond loopback without
// the plaintext option); a client verifying with the CA and logging in with its role key
// connects, one that cannot verify the certificate does not, and in-process clients need
// no TLS.
func TestEmbeddedTLS(t *testing.T) {
	dir := t.TempDir()
	cert, key := selfSigned(t, dir)
	names, _ := NewNames("rtls")
	creds, err := LoadOrCreateCredentials(filepath.Join(dir, "creds"))
	if err != nil {
		t.Fatal(err)
	}
	e, err := StartEmbedded(t.Context(), t.TempDir(), WithServerLogger(testLogger()), WithRoles(creds, names),
		WithListen("0.0.0.0", 0), WithTLS(cert, key))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Shutdown)
	if !strings.HasPrefix(e.URL(), "tls://127.0.0.1:") {
		t.Fatalf("URL %s", e.URL())
	}
	nc, err := Connect(t.Context(), ConnOptions{URL: e.URL(), TLSCA: cert, NKeyFile: CredsFile(filepath.Join(dir, "creds"), RoleStatus), Logger: testLogger()})
	if err != nil {
		t.Fatalf("TLS client: %v", err)
	}
	if !nc.TLSRequired() {
		t.Error("the connection is not over TLS")
	}
	nc.Close()
	// With the key but without the CA: the server's TLS is mandatory (nats:// is upgraded)
	// and its certificate is not trusted.
	login, err := nats.NkeyOptionFromSeed(CredsFile(filepath.Join(dir, "creds"), RoleStatus))
	if err != nil {
		t.Fatal(err)
	}
	plain := strings.Replace(e.URL(), "tls://", "nats://", 1)
	if nc, err := nats.Connect(plain, nats.Timeout(2*time.Second), login); err == nil {
		nc.Close()
		t.Error("a client that does not verify the server's certificate connected")
	}
	in, err := ConnectInProcess(t.Context(), e, creds, RoleCoordinator, ConnOptions{Logger: testLogger()})
	if err != nil {
		t.Fatalf("in process: %v", err)
	}
	in.Close()
}

// TestMsgIDAttempt: a recomputed shard's messages (Attempt set) have ids of their own, on the
// same subjects; the first attempt's ids are unchanged.
func TestMsgIDAttempt(t *testing.T) {
	k := DataKey{Run: "r1", Phase: "cache", Shard: 3, Window: 7, Chunk: 1}
	d := DataKey{Run: "r1", Phase: "cache", Shard: 3, Done: true}
	if MsgID(k) != "r1/cache/3/7/1" || MsgID(d) != "r1/cache/3/done" {
		t.Fatalf("first attempt ids %q %q", MsgID(k), MsgID(d))
	}
	k2, d2 := k, d
	k2.Attempt, d2.Attempt = "0a1b2c", "0a1b2c"
	if MsgID(k2) != "r1/cache/3/7/1/0a1b2c" || MsgID(d2) != "r1/cache/3/done/0a1b2c" {
		t.Fatalf("attempt ids %q %q", MsgID(k2), MsgID(d2))
	}
	if k2.Subject() != k.Subject() || d2.Subject() != d.Subject() {
		t.Fatal("the attempt changed a subject")
	}
	defer func() {
		if recover() == nil {
			t.Fatal("a bad attempt was accepted")
		}
	}()
	k2.Attempt = "a/b"
	MsgID(k2)
}
