package worker

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"linearpatch/internal/fakenats"
)

func TestCheckServerVersion(t *testing.T) {
	for _, c := range []struct {
		v  string
		ok bool
	}{
		{"2.10.0", true}, {"2.15.2", true}, {"3.0.0", true}, {"2.11.0-beta.1", true},
		{"2.9.10", false}, {"2.9.25", false}, {"2.6.0", false}, {"2.10.0-RC.1", false}, {"", false}, {"garbage", false},
	} {
		err := CheckServerVersion(c.v)
		if (err == nil) != c.ok {
			t.Errorf("%q: %v, want ok=%v", c.v, err, c.ok)
		}
		if err != nil && (!errors.Is(err, ErrServerVersion) || !strings.Contains(err.Error(), MinServerVersion())) {
			t.Errorf("%q: %v does not match ErrServerVersion or name %s", c.v, err, MinServerVersion())
		}
	}
	if MinServerVersion() != "2.10.0" {
		t.Errorf("MinServerVersion = %s; consumers with several filter subjects need 2.10.0", MinServerVersion())
	}
}

// TestConnectRefusesOldServer: a server older than the JetStream features the pipeline
// uses (Debian's 2.9.10 has no consumers with several filter subjects) is refused at once
// by Connect — so by every command — naming the version found and the one needed.
func TestConnectRefusesOldServer(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	began := time.Now()
	_, err := Connect(ctx, ConnOptions{URL: fakenats.Start(t, "2.9.10")})
	var ve *ServerVersionError
	if !errors.As(err, &ve) || ve.Found != "2.9.10" || ve.Needed != "2.10.0" ||
		!strings.Contains(err.Error(), "2.9.10") || !strings.Contains(err.Error(), "2.10.0") {
		t.Fatalf("Connect to nats-server 2.9.10: %v, want a ServerVersionError naming 2.9.10 and 2.10.0", err)
	}
	if d := time.Since(began); d > 5*time.Second {
		t.Fatalf("refused after %v: the version error was retried", d)
	}
	nc, err := Connect(ctx, ConnOptions{URL: fakenats.Start(t, "2.10.0")})
	if err != nil {
		t.Fatalf("Connect to a 2.10.0 server: %v", err)
	}
	nc.Close()
}

// startAuthServer starts a nats-server (the real one, in-process) with o's settings on a
// free loopback port.
func startAuthServer(t *testing.T, o *server.Options) *server.Server {
	t.Helper()
	o.Host, o.Port, o.NoLog, o.NoSigs = "127.0.0.1", -1, true, true
	if o.JetStream {
		o.StoreDir = t.TempDir()
	}
	s, err := server.NewServer(o)
	if err != nil {
		t.Fatal(err)
	}
	go s.Start()
	t.Cleanup(s.Shutdown)
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server did not start")
	}
	return s
}

// testPKI writes a CA and a server and a client certificate (both signed by the CA) to dir.
type testPKI struct{ ca, serverCert, serverKey, clientCert, clientKey, otherCA string }

func newTestPKI(t *testing.T) testPKI {
	t.Helper()
	dir := t.TempDir()
	writePEM := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	newKey := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	serial := int64(1)
	newCA := func(name string) (*x509.Certificate, *ecdsa.PrivateKey, string) {
		k := newKey()
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true,
			KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true}
		serial++
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
		if err != nil {
			t.Fatal(err)
		}
		c, _ := x509.ParseCertificate(der)
		return c, k, writePEM(name+".pem", "CERTIFICATE", der)
	}
	ca, caKey, caFile := newCA("ca")
	_, _, otherFile := newCA("other-ca")
	leaf := func(name string, usage x509.ExtKeyUsage) (string, string) {
		k := newKey()
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
			IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"localhost"}}
		serial++
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &k.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kb, err := x509.MarshalECPrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return writePEM(name+".pem", "CERTIFICATE", der), writePEM(name+"-key.pem", "EC PRIVATE KEY", kb)
	}
	p := testPKI{ca: caFile, otherCA: otherFile}
	p.serverCert, p.serverKey = leaf("server", x509.ExtKeyUsageServerAuth)
	p.clientCert, p.clientKey = leaf("client", x509.ExtKeyUsageClientAuth)
	return p
}

// connectFinal connects with o and returns the error, failing the test when Connect took
// longer than a few seconds (a retried error) or succeeded.
func connectFinal(t *testing.T, o ConnOptions) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	o.ReconnectWait = 500 * time.Millisecond
	began := time.Now()
	nc, err := Connect(ctx, o)
	if err == nil {
		nc.Close()
		t.Fatalf("Connect succeeded with %+v", o)
	}
	if d := time.Since(began); d > 5*time.Second || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Connect gave up after %v (%v): the error was retried, not final", d, err)
	}
	return err
}

// TestConnectTLSErrorsFinal: a client certificate the server requires and the client lacks,
// and a server certificate the client cannot verify, are final errors saying so — not
// retried every ReconnectWait as if the server were down.
func TestConnectTLSErrorsFinal(t *testing.T) {
	pki := newTestPKI(t)
	tc, err := server.GenTLSConfig(&server.TLSConfigOpts{CertFile: pki.serverCert, KeyFile: pki.serverKey, CaFile: pki.ca, Verify: true})
	if err != nil {
		t.Fatal(err)
	}
	s := startAuthServer(t, &server.Options{TLS: true, TLSVerify: true, TLSConfig: tc, TLSTimeout: 2})
	url := fmt.Sprintf("tls://127.0.0.1:%d", s.Addr().(*net.TCPAddr).Port)

	err = connectFinal(t, ConnOptions{URL: url, TLSCA: pki.ca})
	if !strings.Contains(err.Error(), "certificate required") {
		t.Errorf("no client certificate: %v, want one saying a certificate is required", err)
	}
	err = connectFinal(t, ConnOptions{URL: url, TLSCA: pki.otherCA, TLSCert: pki.clientCert, TLSKey: pki.clientKey})
	if !strings.Contains(err.Error(), "certificate") {
		t.Errorf("unverifiable server: %v, want a certificate error", err)
	}
	if dialRetryable(err) {
		t.Errorf("%v counts as retryable", err)
	}

	// The right certificate connects, and JetStream answers through it.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	nc, err := Connect(ctx, ConnOptions{URL: url, TLSCA: pki.ca, TLSCert: pki.clientCert, TLSKey: pki.clientKey})
	if err != nil {
		t.Fatalf("TLS with the client certificate: %v", err)
	}
	nc.Close()
}

// TestConnectAuthModes connects with each way of authenticating (token, nkey, creds, TLS
// client certificate) to a real nats-server that requires it, checks the connection works
// (a JetStream call where the server runs JetStream), and that wrong credentials are a
// final error.
func TestConnectAuthModes(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	userKey := func(create func() (nkeys.KeyPair, error)) (nkeys.KeyPair, string, []byte) {
		kp, err := create()
		if err != nil {
			t.Fatal(err)
		}
		pub, _ := kp.PublicKey()
		seed, _ := kp.Seed()
		return kp, pub, seed
	}
	jsWorks := func(t *testing.T, o ConnOptions) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		nc, err := Connect(ctx, o)
		if err != nil {
			t.Fatalf("Connect: %v", err)
		}
		defer nc.Close()
		js, err := jetstream.New(nc)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := js.AccountInfo(ctx); err != nil {
			t.Fatalf("JetStream through the connection: %v", err)
		}
	}
	urlOf := func(s *server.Server) string { return s.ClientURL() }

	t.Run("token", func(t *testing.T) {
		s := startAuthServer(t, &server.Options{JetStream: true, Authorization: "s3cret-token"})
		jsWorks(t, ConnOptions{URL: urlOf(s), Token: "s3cret-token"})
		if err := connectFinal(t, ConnOptions{URL: urlOf(s), Token: "wrong"}); !strings.Contains(strings.ToLower(err.Error()), "authorization") {
			t.Errorf("wrong token: %v", err)
		}
	})
	t.Run("nkey", func(t *testing.T) {
		_, pub, seed := userKey(nkeys.CreateUser)
		s := startAuthServer(t, &server.Options{JetStream: true, Nkeys: []*server.NkeyUser{{Nkey: pub}}})
		jsWorks(t, ConnOptions{URL: urlOf(s), NKeyFile: write("user.nk", seed)})
		_, _, other := userKey(nkeys.CreateUser)
		if err := connectFinal(t, ConnOptions{URL: urlOf(s), NKeyFile: write("other.nk", other)}); !strings.Contains(strings.ToLower(err.Error()), "authorization") {
			t.Errorf("unknown nkey: %v", err)
		}
	})
	t.Run("creds", func(t *testing.T) {
		okp, opub, _ := userKey(nkeys.CreateOperator)
		oc := jwt.NewOperatorClaims(opub)
		if _, err := oc.Encode(okp); err != nil {
			t.Fatal(err)
		}
		akp, apub, _ := userKey(nkeys.CreateAccount)
		ajwt, err := jwt.NewAccountClaims(apub).Encode(okp)
		if err != nil {
			t.Fatal(err)
		}
		_, upub, useed := userKey(nkeys.CreateUser)
		ujwt, err := jwt.NewUserClaims(upub).Encode(akp)
		if err != nil {
			t.Fatal(err)
		}
		creds, err := jwt.FormatUserConfig(ujwt, useed)
		if err != nil {
			t.Fatal(err)
		}
		resolver := &server.MemAccResolver{}
		if err := resolver.Store(apub, ajwt); err != nil {
			t.Fatal(err)
		}
		s := startAuthServer(t, &server.Options{TrustedOperators: []*jwt.OperatorClaims{oc}, AccountResolver: resolver})
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		nc, err := Connect(ctx, ConnOptions{URL: urlOf(s), CredsFile: write("user.creds", creds)})
		if err != nil {
			t.Fatalf("Connect with creds: %v", err)
		}
		sub, err := nc.SubscribeSync("lp.test")
		if err == nil {
			err = nc.Publish("lp.test", []byte("x"))
		}
		if err == nil {
			_, err = sub.NextMsg(5 * time.Second)
		}
		nc.Close()
		if err != nil {
			t.Fatalf("a message through the creds connection: %v", err)
		}
		// A user signed by another account's key is refused.
		okp2, _, _ := userKey(nkeys.CreateAccount)
		_, upub2, useed2 := userKey(nkeys.CreateUser)
		ujwt2, _ := jwt.NewUserClaims(upub2).Encode(okp2)
		creds2, _ := jwt.FormatUserConfig(ujwt2, useed2)
		if err := connectFinal(t, ConnOptions{URL: urlOf(s), CredsFile: write("other.creds", creds2)}); !strings.Contains(strings.ToLower(err.Error()), "authorization") {
			t.Errorf("foreign creds: %v", err)
		}
	})
	t.Run("tls-client-cert", func(t *testing.T) {
		pki := newTestPKI(t)
		tc, err := server.GenTLSConfig(&server.TLSConfigOpts{CertFile: pki.serverCert, KeyFile: pki.serverKey, CaFile: pki.ca, Verify: true})
		if err != nil {
			t.Fatal(err)
		}
		s := startAuthServer(t, &server.Options{JetStream: true, TLS: true, TLSVerify: true, TLSConfig: tc, TLSTimeout: 2})
		url := fmt.Sprintf("tls://127.0.0.1:%d", s.Addr().(*net.TCPAddr).Port)
		jsWorks(t, ConnOptions{URL: url, TLSCA: pki.ca, TLSCert: pki.clientCert, TLSKey: pki.clientKey})
	})
}
