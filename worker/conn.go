package worker

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
)

// ConnOptions says where NATS is and how to authenticate. At most one of
// User/Password, Token, NKeyFile and CredsFile may be set. TLSCert and TLSKey
// go together (client certificate); TLSCA alone verifies the server.
type ConnOptions struct {
	URL       string // one or more comma-separated nats://, tls://, ws:// or wss:// URLs
	User      string
	Password  string
	Token     string
	NKeyFile  string // nkey seed file
	CredsFile string // JWT + nkey credentials file
	TLSCert   string
	TLSKey    string
	TLSCA     string
	Name      string // client name shown by the server; default "linearpatch"
	// ReconnectWait is the pause between reconnect attempts (default 2s).
	// Reconnects never stop, so a restarted server is survived.
	ReconnectWait time.Duration
	Logger        *slog.Logger // default: discarded
}

// Validate checks o and fills defaults. Errors wrap ErrInvalidOption.
func (o *ConnOptions) Validate() error {
	if strings.TrimSpace(o.URL) == "" {
		return fmt.Errorf("%w: empty NATS URL", ErrInvalidOption)
	}
	for _, raw := range strings.Split(o.URL, ",") {
		u, err := url.Parse(strings.TrimSpace(raw))
		if err != nil {
			return fmt.Errorf("%w: NATS URL %q: %w", ErrInvalidOption, raw, err)
		}
		switch u.Scheme {
		case "nats", "tls", "ws", "wss":
		default:
			return fmt.Errorf("%w: NATS URL %q: scheme must be nats, tls, ws or wss", ErrInvalidOption, raw)
		}
		if u.Host == "" {
			return fmt.Errorf("%w: NATS URL %q: no host", ErrInvalidOption, raw)
		}
	}
	auth := 0
	if o.User != "" || o.Password != "" {
		if o.User == "" {
			return fmt.Errorf("%w: password without user", ErrInvalidOption)
		}
		auth++
	}
	for _, s := range []string{o.Token, o.NKeyFile, o.CredsFile} {
		if s != "" {
			auth++
		}
	}
	if auth > 1 {
		return fmt.Errorf("%w: give only one of user/password, token, nkey file, creds file", ErrInvalidOption)
	}
	if (o.TLSCert == "") != (o.TLSKey == "") {
		return fmt.Errorf("%w: TLS cert and key go together", ErrInvalidOption)
	}
	if o.ReconnectWait < 0 {
		return fmt.Errorf("%w: negative reconnect wait", ErrInvalidOption)
	}
	if o.Name == "" {
		o.Name = "linearpatch"
	}
	if o.ReconnectWait == 0 {
		o.ReconnectWait = 2 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// natsOptions turns validated options into nats.go options.
func (o *ConnOptions) natsOptions() ([]nats.Option, error) {
	log := o.Logger
	opts := []nats.Option{
		nats.Name(o.Name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(o.ReconnectWait),
		nats.DisconnectErrHandler(func(nc *nats.Conn, err error) {
			if err == nil { // our own Close
				log.Debug("nats disconnected")
				return
			}
			log.Warn("nats disconnected", "err", err)
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			log.Info("nats reconnected", "url", nc.ConnectedUrlRedacted())
		}),
		nats.ClosedHandler(func(nc *nats.Conn) {
			log.Info("nats connection closed")
		}),
		nats.ErrorHandler(func(nc *nats.Conn, sub *nats.Subscription, err error) {
			subj := ""
			if sub != nil {
				subj = sub.Subject
			}
			log.Error("nats async error", "subject", subj, "err", err)
		}),
	}
	switch {
	case o.User != "":
		opts = append(opts, nats.UserInfo(o.User, o.Password))
	case o.Token != "":
		opts = append(opts, nats.Token(o.Token))
	case o.NKeyFile != "":
		opt, err := nats.NkeyOptionFromSeed(o.NKeyFile)
		if err != nil {
			return nil, fmt.Errorf("worker: nkey file: %w", err)
		}
		opts = append(opts, opt)
	case o.CredsFile != "":
		opts = append(opts, nats.UserCredentials(o.CredsFile))
	}
	if o.TLSCert != "" {
		opts = append(opts, nats.ClientCert(o.TLSCert, o.TLSKey))
	}
	if o.TLSCA != "" {
		opts = append(opts, nats.RootCAs(o.TLSCA))
	}
	return opts, nil
}

// Connect validates o and connects, retrying dial failures (the server is not
// up yet) every ReconnectWait until ctx ends; other errors (authorization, TLS
// certificates and verification, unreadable files) are returned at once, as is a
// server older than MinServerVersion (a *ServerVersionError naming both versions). Once connected the connection
// reconnects forever, logging disconnects and reconnects, so a restarted
// server is survived. The caller closes the connection.
func Connect(ctx context.Context, o ConnOptions) (*nats.Conn, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	opts, err := o.natsOptions()
	if err != nil {
		return nil, err
	}
	for {
		nc, err := nats.Connect(o.URL, opts...)
		if err == nil {
			if err := CheckServerVersion(nc.ConnectedServerVersion()); err != nil {
				nc.Close()
				return nil, fmt.Errorf("worker: connect %s: %w", redactURL(o.URL), err)
			}
			o.Logger.Info("nats connected", "url", nc.ConnectedUrlRedacted(),
				"max_payload", nc.MaxPayload(), "server_version", nc.ConnectedServerVersion())
			return nc, nil
		}
		if !dialRetryable(err) {
			return nil, fmt.Errorf("worker: connect %s: %w", redactURL(o.URL), err)
		}
		o.Logger.Warn("nats not reachable, retrying", "url", redactURL(o.URL), "err", err)
		t := time.NewTimer(o.ReconnectWait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("worker: connect %s: %w (last error: %w)", redactURL(o.URL), ctx.Err(), err)
		case <-t.C:
		}
	}
}

// dialRetryable reports whether a failed connect is worth retrying: nobody
// listens yet or the network is not there yet, as opposed to a refused login or a
// TLS failure (a certificate the server requires and the client lacks, one that does
// not verify, a server that does not speak TLS), which a retry cannot mend. Those
// arrive as network errors too, so they are looked for first.
func dialRetryable(err error) bool {
	var (
		alert     tls.AlertError
		record    tls.RecordHeaderError
		verify    *tls.CertificateVerificationError
		unknownCA x509.UnknownAuthorityError
		hostname  x509.HostnameError
		invalid   x509.CertificateInvalidError
	)
	switch {
	case errors.As(err, &alert), errors.As(err, &record), errors.As(err, &verify),
		errors.As(err, &unknownCA), errors.As(err, &hostname), errors.As(err, &invalid):
		return false
	}
	// crypto/tls reports an alert the peer sent (a required certificate missing, a bad
	// one) as a *net.OpError with Op "remote error" around its unexported alert type.
	var opErr *net.OpError
	if errors.As(err, &opErr) && opErr.Op == "remote error" {
		return false
	}
	var netErr net.Error
	return errors.Is(err, nats.ErrNoServers) || errors.As(err, &netErr)
}

// redactURL hides passwords in URLs for logs and errors.
func redactURL(s string) string {
	parts := strings.Split(s, ",")
	for i, p := range parts {
		if u, err := url.Parse(strings.TrimSpace(p)); err == nil {
			parts[i] = u.Redacted()
		}
	}
	return strings.Join(parts, ",")
}

// MaxPayload is the server's max_payload as announced to nc: the most bytes
// of payload plus encoded headers one message may carry. It is 0 before the
// first connection.
func MaxPayload(nc *nats.Conn) int { return int(nc.MaxPayload()) }
