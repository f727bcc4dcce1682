package deploy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.yaml.in/yaml/v3"

	"linearpatch/worker"
)

// The linearpatch binary, built once by the first test that needs it, and the flags of each
// subcommand read from its --help.
var (
	binOnce sync.Once
	binDir  string
	binPath string
	binErr  error

	helpMu    sync.Mutex
	helpFlags = map[string]map[string]bool{}
	subs      map[string]bool
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// linearpatch builds cmd/linearpatch (with this test's environment: the OpenBLAS build, or
// the pure-Go one under CGO_ENABLED=0) and returns the binary's path.
func linearpatch(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		if binDir, binErr = os.MkdirTemp("", "linearpatch-deploy-"); binErr != nil {
			return
		}
		binPath = filepath.Join(binDir, "linearpatch")
		out, err := exec.Command("go", "build", "-o", binPath, "linearpatch/cmd/linearpatch").CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

var (
	flagLine    = regexp.MustCompile(`^\s+(?:-\w, )?--([a-z0-9][a-z0-9-]*)`)
	commandLine = regexp.MustCompile(`^\s{2}([a-z][a-z0-9-]*)\s+\S`)
)

// subcommands returns the binary's subcommands, from `linearpatch --help`.
func subcommands(t *testing.T) map[string]bool {
	t.Helper()
	helpMu.Lock()
	defer helpMu.Unlock()
	if subs != nil {
		return subs
	}
	out, err := exec.Command(linearpatch(t), "--help").CombinedOutput()
	if err != nil {
		t.Fatalf("linearpatch --help: %v\n%s", err, out)
	}
	found := map[string]bool{}
	inCommands := false
	for _, line := range strings.Split(string(out), "\n") {
		switch {
		case strings.HasPrefix(line, "Available Commands:"):
			inCommands = true
		case strings.TrimSpace(line) == "":
			inCommands = false
		case inCommands:
			if m := commandLine.FindStringSubmatch(line); m != nil {
				found[m[1]] = true
			}
		}
	}
	for _, want := range []string{"coordinator", "teacher", "cache", "status", "nats-server", "run"} {
		if !found[want] {
			t.Fatalf("linearpatch --help lists no %q subcommand:\n%s", want, out)
		}
	}
	subs = found
	return subs
}

// flagsOf returns the flags (global ones included) of a subcommand, from its --help.
func flagsOf(t *testing.T, sub string) map[string]bool {
	t.Helper()
	if !subcommands(t)[sub] {
		return nil
	}
	helpMu.Lock()
	defer helpMu.Unlock()
	if f, ok := helpFlags[sub]; ok {
		return f
	}
	out, err := exec.Command(linearpatch(t), sub, "--help").CombinedOutput()
	if err != nil {
		t.Fatalf("linearpatch %s --help: %v\n%s", sub, err, out)
	}
	f := map[string]bool{}
	for _, line := range strings.Split(string(out), "\n") {
		if m := flagLine.FindStringSubmatch(line); m != nil {
			f[m[1]] = true
		}
	}
	if !f["help"] || !f["threads"] {
		t.Fatalf("linearpatch %s --help: no flags found:\n%s", sub, out)
	}
	helpFlags[sub] = f
	return f
}

// checkArgs checks a linearpatch command line without the binary: args[0] must be a
// subcommand and every --flag one of its flags.
func checkArgs(t *testing.T, where string, args []string) {
	t.Helper()
	if len(args) == 0 {
		t.Errorf("%s: linearpatch without a subcommand", where)
		return
	}
	flags := flagsOf(t, args[0])
	if flags == nil {
		t.Errorf("%s: linearpatch has no subcommand %q", where, args[0])
		return
	}
	for _, a := range args[1:] {
		if !strings.HasPrefix(a, "--") {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if !flags[name] {
			t.Errorf("%s: linearpatch %s has no flag --%s", where, args[0], name)
		}
	}
}

// checkEnv checks that an environment variable LINEARPATCH_X names a flag of sub.
func checkEnv(t *testing.T, where, sub, name string) {
	t.Helper()
	key, ok := strings.CutPrefix(name, "LINEARPATCH_")
	if !ok {
		return
	}
	flag := strings.ReplaceAll(strings.ToLower(key), "_", "-")
	if flags := flagsOf(t, sub); flags != nil && !flags[flag] {
		t.Errorf("%s: %s names no flag of linearpatch %s (--%s)", where, name, sub, flag)
	}
}

// checkConfigKeys checks a linearpatch --config file: every key a flag of sub.
func checkConfigKeys(t *testing.T, where, sub string, cfg map[string]any) {
	t.Helper()
	flags := flagsOf(t, sub)
	for k := range cfg {
		if !flags[k] {
			t.Errorf("%s: key %q is not a flag of linearpatch %s", where, k, sub)
		}
	}
}

// files lists the files under dir (relative to the package) whose names end in one of exts.
func files(t *testing.T, dir string, exts ...string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && slices.ContainsFunc(exts, func(e string) bool { return strings.HasSuffix(path, e) }) {
			out = append(out, path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(out)
	return out
}

// yamlDocs decodes every document of a YAML file (or string).
func yamlDocs(t *testing.T, where string, data []byte) []map[string]any {
	t.Helper()
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var docs []map[string]any
	for {
		var doc map[string]any
		err := dec.Decode(&doc)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("%s: %v", where, err)
		}
		if doc != nil {
			docs = append(docs, doc)
		}
	}
	return docs
}

func readYAML(t *testing.T, path string) []map[string]any {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	docs := yamlDocs(t, path, data)
	if len(docs) == 0 {
		t.Fatalf("%s: no YAML documents", path)
	}
	return docs
}

// get walks a decoded YAML tree by map keys and list indexes ("spec", "template", 0, ...).
func get(v any, path ...any) any {
	for _, p := range path {
		switch k := p.(type) {
		case string:
			m, ok := v.(map[string]any)
			if !ok {
				return nil
			}
			v = m[k]
		case int:
			l, ok := v.([]any)
			if !ok || k >= len(l) {
				return nil
			}
			v = l[k]
		}
	}
	return v
}

func strs(v any) []string {
	l, _ := v.([]any)
	out := make([]string, 0, len(l))
	for _, x := range l {
		out = append(out, fmt.Sprint(x))
	}
	return out
}

// TestYAMLFiles decodes every document of every YAML file here.
func TestYAMLFiles(t *testing.T) {
	paths := files(t, ".", ".yml", ".yaml")
	if len(paths) < 10 {
		t.Fatalf("only %d YAML files: %v", len(paths), paths)
	}
	for _, path := range paths {
		readYAML(t, path)
	}
}

// ---- NATS server configurations ----

// parseConf parses a nats-server configuration strictly (warnings fail too) and checks
// what every linearpatch server needs: JetStream on a store directory, a max_payload of at
// least 1 MiB with max_pending above it, a server name, monitoring on 8222.
func parseConf(t *testing.T, where string, parse func(*server.Options) error) *server.Options {
	t.Helper()
	o := &server.Options{}
	if err := parse(o); err != nil {
		t.Fatalf("%s: %v", where, err)
	}
	if !o.JetStream {
		t.Errorf("%s: JetStream is not enabled", where)
	}
	if o.StoreDir == "" {
		t.Errorf("%s: no jetstream store_dir", where)
	}
	if o.JetStreamMaxStore <= 0 {
		t.Errorf("%s: no max_file_store", where)
	}
	if o.MaxPayload < 1<<20 {
		t.Errorf("%s: max_payload %d < 1 MiB", where, o.MaxPayload)
	}
	if o.MaxPending != 0 && o.MaxPending < int64(o.MaxPayload) {
		t.Errorf("%s: max_pending %d < max_payload %d", where, o.MaxPending, o.MaxPayload)
	}
	if o.ServerName == "" {
		t.Errorf("%s: no server_name", where)
	}
	if o.HTTPPort != 8222 {
		t.Errorf("%s: monitoring port %d, want 8222", where, o.HTTPPort)
	}
	// NewServer validates the options the way the server does at start-up (without
	// listening); point the store at a directory that exists.
	o.StoreDir = t.TempDir()
	o.NoSigs, o.NoLog = true, true
	if _, err := server.NewServer(o); err != nil {
		t.Errorf("%s: nats-server rejects the options: %v", where, err)
	}
	return o
}

func TestNATSConfigs(t *testing.T) {
	confs := files(t, "nats", ".conf")
	want := []string{"nats/accounts.conf", "nats/auth.conf", "nats/cluster/node-a.conf", "nats/cluster/node-b.conf", "nats/cluster/node-c.conf", "nats/nats-server.conf"}
	if !slices.Equal(confs, want) {
		t.Fatalf("configs %v, want %v", confs, want)
	}
	opts := map[string]*server.Options{}
	for _, path := range confs {
		if path == "nats/accounts.conf" {
			continue // users only: checked through auth.conf and the cluster nodes, which include it
		}
		opts[path] = parseConf(t, path, func(o *server.Options) error { return o.ProcessConfigFile(path) })
	}

	single := opts["nats/nats-server.conf"]
	if single.MaxPayload < 8<<20 {
		t.Errorf("nats-server.conf: max_payload %d, want 8 MiB", single.MaxPayload)
	}
	if single.WriteDeadline < 10*time.Second {
		t.Errorf("nats-server.conf: write_deadline %v", single.WriteDeadline)
	}

	auth := opts["nats/auth.conf"]
	if auth.SystemAccount != "SYS" {
		t.Errorf("auth.conf: system_account %q", auth.SystemAccount)
	}
	users := map[string]*server.User{}
	for _, u := range auth.Users {
		users[u.Username] = u
		if !strings.HasPrefix(u.Password, "$2a$") {
			t.Errorf("auth.conf: user %s: password is not a bcrypt hash", u.Username)
		}
	}
	for _, name := range []string{"coordinator", "teacher", "cache", "status"} {
		u := users[name]
		if u == nil || u.Account == nil || u.Account.Name != "LINEARPATCH" {
			t.Errorf("auth.conf: no user %s in account LINEARPATCH", name)
		}
	}

	names := map[string]bool{}
	for _, n := range []string{"a", "b", "c"} {
		path := "nats/cluster/node-" + n + ".conf"
		o := opts[path]
		names[o.ServerName] = true
		if o.Cluster.Name != "linearpatch" || o.Cluster.Port != 6222 {
			t.Errorf("%s: cluster %q port %d", path, o.Cluster.Name, o.Cluster.Port)
		}
		var routes []string
		for _, r := range o.Routes {
			routes = append(routes, r.Host)
		}
		sort.Strings(routes)
		if !slices.Equal(routes, []string{"nats-a:6222", "nats-b:6222", "nats-c:6222"}) {
			t.Errorf("%s: routes %v", path, routes)
		}
		checkRoles(t, path, o.Users)
		if o.ServerName != "nats-"+n {
			t.Errorf("%s: server_name %q (routes name the nodes nats-a/b/c)", path, o.ServerName)
		}
	}
	if len(names) != 3 {
		t.Errorf("cluster nodes share server names: %v", names)
	}

	// The configuration embedded in the Kubernetes NATS ConfigMap.
	for _, doc := range readYAML(t, "kubernetes/nats.yaml") {
		if doc["kind"] == "ConfigMap" {
			conf, _ := get(doc, "data", "nats.conf").(string)
			if conf == "" {
				t.Fatal("kubernetes/nats.yaml: the ConfigMap has no nats.conf")
			}
			parseConf(t, "kubernetes/nats.yaml nats.conf", func(o *server.Options) error { return o.ProcessConfigString(conf) })
		}
	}
}

// TestAuthConfPipeline runs a small pipeline through a server started from auth.conf: each
// role logs in with its own user and the example password, the roles' permissions let the
// run finish, a teacher cannot delete a stream, and status works read-only.
func TestAuthConfPipeline(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the pipeline (about 10 s)")
	}
	bin := linearpatch(t)
	o, err := server.ProcessConfigFile("nats/auth.conf")
	if err != nil {
		t.Fatal(err)
	}
	o.Host, o.Port, o.HTTPPort = "127.0.0.1", -1, 0
	o.StoreDir = t.TempDir()
	o.NoSigs = true
	srv, err := server.NewServer(o)
	if err != nil {
		t.Fatal(err)
	}
	serverLog := &errorLog{}
	srv.SetLoggerV2(serverLog, false, false, false)
	go srv.Start()
	t.Cleanup(srv.Shutdown)
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server from auth.conf did not start")
	}
	url := srv.ClientURL()

	dir := t.TempDir()
	model, data := filepath.Join(dir, "synth"), filepath.Join(dir, "data.jsonl")
	run(t, bin, nil, "synth", "--out", model, "--dim", "64", "--layers", "4", "--heads", "4", "--kv-heads", "2",
		"--ffn", "128", "--vocab", "256", "--data", data, "--data-tokens", "32768")
	runDir := filepath.Join(dir, "out.run")
	login := func(user string) []string {
		return []string{"LINEARPATCH_NATS_USER=" + user, "LINEARPATCH_NATS_PASSWORD=change-me-" + user, "LINEARPATCH_THREADS=1"}
	}

	coord := start(t, bin, login("coordinator"), "coordinator", "--nats", url, "--model", model, "--calib", data,
		"--train", data, "--num-prune", "1", "--seq-len", "64", "--calib-windows", "16", "--shard-windows", "8",
		"--top-k", "8", "--checkpoint-every", "3", "--out", filepath.Join(dir, "out"), "--run-dir", runDir)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if b, err := os.ReadFile(filepath.Join(runDir, "run.id")); err == nil && len(bytes.TrimSpace(b)) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the coordinator wrote no run.id:\n%s", coord.out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	teacher := start(t, bin, login("teacher"), "teacher", "--nats", url, "--run-dir", runDir, "--model", model, "--name", "t1")
	cache := start(t, bin, login("cache"), "cache", "--nats", url, "--run-dir", runDir, "--model", model,
		"--dir", filepath.Join(runDir, "cache"))
	// The student: its own user, its own directory; it replaces its checkpoint in the object
	// store every 3 steps.
	student := start(t, bin, login("student"), "student", "--nats", url, "--run-dir", runDir, "--model", model,
		"--dir", filepath.Join(dir, "student"))
	if out, err := coord.wait(t, 90*time.Second); err != nil {
		t.Fatalf("coordinator: %v\n%s\nteacher:\n%s\ncache:\n%s\nstudent:\n%s", err, tail(out), tail(teacher.out.String()), tail(cache.out.String()), tail(student.out.String()))
	}
	if b, err := os.ReadFile(filepath.Join(dir, "out", "linearpatch.json")); err != nil || !bytes.Contains(b, []byte(`"method": "kd"`)) {
		t.Errorf("the coordinator did not export the student's patch (method kd): %v", err)
	}
	for _, p := range []*proc{teacher, cache, student} {
		if out, err := p.wait(t, 30*time.Second); err != nil {
			t.Errorf("%s: %v\n%s", p.name, err, tail(out))
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "out", "model.safetensors")); err != nil {
		t.Errorf("no pruned model: %v", err)
	}

	out := run(t, bin, login("status"), "status", "--nats", url, "--run-dir", runDir)
	if !strings.Contains(out, "phase done") {
		t.Errorf("status as user status:\n%s", out)
	}
	// The roles are exactly what the workers need: no permission violation anywhere, no
	// error line in any process's log.
	for _, p := range []*proc{coord, teacher, cache} {
		for _, line := range strings.Split(p.out.String(), "\n") {
			if strings.Contains(line, "level=ERROR") || strings.Contains(strings.ToLower(line), "permissions violation") {
				t.Errorf("%s logged: %s", p.name, line)
			}
		}
	}
	if errs := serverLog.errors(); len(errs) > 0 {
		t.Errorf("the server logged errors:\n%s", strings.Join(errs, "\n"))
	}

	// A wrong password is refused, for the run that exists (the same query succeeded just
	// above with the right one), and the refusal names the authorization.
	if out, err := start(t, bin, []string{"LINEARPATCH_NATS_USER=status", "LINEARPATCH_NATS_PASSWORD=wrong"},
		"status", "--nats", url, "--run-dir", runDir).wait(t, 30*time.Second); err == nil || !strings.Contains(strings.ToLower(out), "authorization") {
		t.Errorf("status with a wrong password: %v, want an authorization error:\n%s", err, out)
	}

	// The teacher's permissions: it may read streams but not delete them.
	runID, _ := os.ReadFile(filepath.Join(runDir, "run.id"))
	stream := "LP_" + strings.TrimSpace(string(runID)) + "_DATA"
	nc, err := nats.Connect(url, nats.UserInfo("teacher", "change-me-teacher"), nats.ErrorHandler(func(*nats.Conn, *nats.Subscription, error) {}))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if _, err := js.Stream(ctx, stream); err != nil {
		t.Fatalf("teacher cannot read stream %s: %v", stream, err)
	}
	ctx2, cancel2 := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel2()
	if err := js.DeleteStream(ctx2, stream); err == nil {
		t.Errorf("user teacher deleted stream %s", stream)
	}
	ctx3, cancel3 := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel3()
	if _, err := js.Stream(ctx3, stream); err != nil {
		t.Errorf("stream %s is gone: %v", stream, err)
	}
}

// errorLog is a nats-server logger that keeps the error lines.
type errorLog struct {
	mu   sync.Mutex
	errs []string
}

func (l *errorLog) Noticef(string, ...any) {}
func (l *errorLog) Warnf(string, ...any)   {}
func (l *errorLog) Debugf(string, ...any)  {}
func (l *errorLog) Tracef(string, ...any)  {}
func (l *errorLog) Fatalf(format string, v ...any) {
	l.Errorf(format, v...)
}
func (l *errorLog) Errorf(format string, v ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.errs = append(l.errs, fmt.Sprintf(format, v...))
}

func (l *errorLog) errors() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.errs...)
}

// TestAuthConfRoles: auth.conf's users and those of the Kubernetes NATS configuration have
// exactly the permissions of the linearpatch roles on a shared server
// (worker.AnyRunPermissions), the coordinator none.
func TestAuthConfRoles(t *testing.T) {
	o, err := server.ProcessConfigFile("nats/auth.conf")
	if err != nil {
		t.Fatal(err)
	}
	checkRoles(t, "auth.conf", o.Users)
	found := false
	for _, doc := range readYAML(t, "kubernetes/nats.yaml") {
		if doc["kind"] == "ConfigMap" {
			conf, _ := get(doc, "data", "nats.conf").(string)
			o := &server.Options{}
			if err := o.ProcessConfigString(conf); err != nil {
				t.Fatalf("kubernetes/nats.yaml: %v", err)
			}
			checkRoles(t, "kubernetes/nats.yaml", o.Users)
			found = true
		}
	}
	if !found {
		t.Error("kubernetes/nats.yaml: no NATS configuration")
	}
}

func checkRoles(t *testing.T, where string, list []*server.User) {
	t.Helper()
	users := map[string]*server.User{}
	for _, u := range list {
		users[u.Username] = u
	}
	if u := users["coordinator"]; u == nil || u.Permissions != nil {
		t.Errorf("%s: user coordinator: %+v, want no restriction", where, u)
	}
	for _, r := range worker.FileRoles {
		u := users[string(r)]
		if u == nil || u.Permissions == nil || u.Permissions.Publish == nil {
			t.Errorf("%s: no restricted user %s", where, r)
			continue
		}
		want := worker.AnyRunPermissions(r)
		got := u.Permissions.Publish
		if !slices.Equal(sorted(got.Allow), sorted(want.Publish.Allow)) || !slices.Equal(sorted(got.Deny), sorted(want.Publish.Deny)) {
			t.Errorf("%s: user %s publishes\nallow %v\ndeny %v\nwant\nallow %v\ndeny %v", where, r, got.Allow, got.Deny, want.Publish.Allow, want.Publish.Deny)
		}
		if u.Permissions.Subscribe != nil {
			t.Errorf("%s: user %s: subscriptions are restricted", where, r)
		}
	}
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	sort.Strings(s)
	return s
}

// proc is a linearpatch process of TestAuthConfPipeline.
type proc struct {
	name string
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan error
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func start(t *testing.T, bin string, env []string, args ...string) *proc {
	t.Helper()
	p := &proc{name: args[0], cmd: exec.Command(bin, args...), out: &syncBuffer{}, done: make(chan error, 1)}
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		err := <-p.done
		p.done <- err
	})
	return p
}

func (p *proc) wait(t *testing.T, d time.Duration) (string, error) {
	t.Helper()
	select {
	case err := <-p.done:
		p.done <- err
		return p.out.String(), err
	case <-time.After(d):
		t.Fatalf("%s did not finish in %v:\n%s", p.name, d, tail(p.out.String()))
		return "", nil
	}
}

func run(t *testing.T, bin string, env []string, args ...string) string {
	t.Helper()
	out, err := start(t, bin, env, args...).wait(t, 60*time.Second)
	if err != nil {
		t.Fatalf("linearpatch %s: %v\n%s", strings.Join(args, " "), err, tail(out))
	}
	return out
}

func tail(s string) string {
	if len(s) > 3000 {
		return "…" + s[len(s)-3000:]
	}
	return s
}

// ---- docker compose ----

func TestCompose(t *testing.T) {
	docs := readYAML(t, "compose/docker-compose.yml")
	if len(docs) != 1 {
		t.Fatalf("docker-compose.yml: %d documents", len(docs))
	}
	services, _ := docs[0]["services"].(map[string]any)
	for _, name := range []string{"nats", "coordinator", "teacher", "cache", "student"} {
		if services[name] == nil {
			t.Errorf("docker-compose.yml: no service %s", name)
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	// NATS: the official image (2.10 or later) with deploy/nats/auth.conf and -js.
	nats := services["nats"]
	image, _ := get(nats, "image").(string)
	if m := regexp.MustCompile(`^nats:2\.(\d+)`).FindStringSubmatch(image); m == nil || atoi(m[1]) < 10 {
		t.Errorf("nats image %q, want nats:2.10 or later", image)
	}
	cmd := strs(get(nats, "command"))
	if !slices.Contains(cmd, "-js") || !slices.Contains(cmd, "/etc/nats/auth.conf") {
		t.Errorf("nats command %v: want --config /etc/nats/auth.conf -js (authenticated by default)", cmd)
	}

	// Bind mounts with relative sources exist (${VAR:-default} sources are the user's).
	for name, svc := range services {
		for _, v := range strs(get(svc, "volumes")) {
			src, _, _ := strings.Cut(v, ":")
			if strings.HasPrefix(src, ".") {
				if _, err := os.Stat(filepath.Join("compose", src)); err != nil {
					t.Errorf("service %s: volume source %s: %v", name, src, err)
				}
			}
		}
		if ctx, _ := get(svc, "build", "context").(string); ctx != "" {
			df, _ := get(svc, "build", "dockerfile").(string)
			if _, err := os.Stat(filepath.Join("compose", ctx, df)); err != nil {
				t.Errorf("service %s: Dockerfile: %v", name, err)
			}
			if _, err := os.Stat(filepath.Join("compose", ctx, "go.mod")); err != nil {
				t.Errorf("service %s: build context is not the repository root: %v", name, err)
			}
		}
	}

	if r, _ := get(services["teacher"], "deploy", "replicas").(int); r != 2 {
		t.Errorf("teacher deploy.replicas = %v, want 2", get(services["teacher"], "deploy", "replicas"))
	}
	if r, ok := get(services["cache"], "deploy", "replicas").(int); ok && r != 1 {
		t.Errorf("cache deploy.replicas = %d: the cache writer must be alone", r)
	}

	// The linearpatch services: subcommand, flags and LINEARPATCH_ variables exist; the
	// teachers and the cache writer use the coordinator's run directory and model.
	runCfg := readYAML(t, "compose/run.yaml")[0]
	checkConfigKeys(t, "compose/run.yaml", "coordinator", runCfg)
	checkRunConfig(t, "compose/run.yaml", runCfg)
	for _, name := range []string{"coordinator", "teacher", "cache", "student"} {
		svc := services[name]
		args := strs(get(svc, "command"))
		where := "docker-compose.yml service " + name
		if len(args) == 0 || args[0] != name {
			t.Errorf("%s: command %v does not start with %q", where, args, name)
		}
		checkArgs(t, where, args)
		env, _ := get(svc, "environment").(map[string]any)
		for k := range env {
			checkEnv(t, where, name, k)
		}
		if name == "teacher" || name == "cache" {
			checkWorkerArgs(t, where, args, runCfg)
		}
	}
	if _, err := os.Stat("compose/Dockerfile.dockerignore"); err != nil {
		t.Error(err)
	}
}

// checkRunConfig checks a run.yaml: the keys a distributed run needs, and an external NATS.
func checkRunConfig(t *testing.T, where string, cfg map[string]any) {
	t.Helper()
	for _, k := range []string{"model", "calib", "train", "num-prune", "method", "out", "run-dir", "nats"} {
		if cfg[k] == nil {
			t.Errorf("%s: no %s", where, k)
		}
	}
	if cfg["method"] == "all" {
		t.Errorf("%s: method all is for prune only", where)
	}
}

// checkWorkerArgs checks that a teacher's or cache writer's --run-dir and --model are the
// coordinator's (when they are given).
func checkWorkerArgs(t *testing.T, where string, args []string, cfg map[string]any) {
	t.Helper()
	for i := 1; i+1 < len(args); i++ {
		switch args[i] {
		case "--run-dir":
			if args[i+1] != cfg["run-dir"] {
				t.Errorf("%s: --run-dir %s, the coordinator's is %v", where, args[i+1], cfg["run-dir"])
			}
		case "--dir":
			if args[i+1] != fmt.Sprint(cfg["run-dir"])+"/cache" {
				t.Errorf("%s: --dir %s is not the coordinator's run-dir/cache", where, args[i+1])
			}
		case "--model":
			if args[i+1] != cfg["model"] {
				t.Errorf("%s: --model %s, the coordinator's is %v", where, args[i+1], cfg["model"])
			}
		}
	}
}

// ---- Kubernetes ----

func TestKubernetes(t *testing.T) {
	paths := files(t, "kubernetes", ".yaml", ".yml")
	kinds := map[string][]map[string]any{}
	byFile := map[string][]map[string]any{}
	for _, path := range paths {
		docs := readYAML(t, path)
		byFile[path] = docs
		if filepath.Base(path) == "nats-helm-values.yaml" {
			continue
		}
		for _, doc := range docs {
			kind, _ := doc["kind"].(string)
			if doc["apiVersion"] == nil || kind == "" {
				t.Errorf("%s: a document without apiVersion or kind", path)
				continue
			}
			if kind != "Kustomization" && get(doc, "metadata", "name") == nil {
				t.Errorf("%s: %s without metadata.name", path, kind)
			}
			kinds[kind] = append(kinds[kind], doc)
		}
	}
	for kind, n := range map[string]int{"StatefulSet": 1, "Service": 2, "Job": 1, "Deployment": 3, "PersistentVolumeClaim": 2, "ConfigMap": 2, "Kustomization": 1} {
		if len(kinds[kind]) != n {
			t.Errorf("%d %s, want %d", len(kinds[kind]), kind, n)
		}
	}

	// kustomization.yaml lists every manifest but the Helm values.
	var listed []string
	for _, r := range strs(get(kinds["Kustomization"][0], "resources")) {
		listed = append(listed, filepath.Join("kubernetes", r))
	}
	sort.Strings(listed)
	var manifests []string
	for _, p := range paths {
		if b := filepath.Base(p); b != "kustomization.yaml" && b != "nats-helm-values.yaml" {
			manifests = append(manifests, p)
		}
	}
	if !slices.Equal(listed, manifests) {
		t.Errorf("kustomization resources %v, manifests %v", listed, manifests)
	}

	// The Helm alternative: JetStream on, 8 MiB payloads.
	vals := byFile["kubernetes/nats-helm-values.yaml"][0]
	if get(vals, "config", "jetstream", "enabled") != true || get(vals, "config", "merge", "max_payload") != "<< 8MB >>" {
		t.Errorf("nats-helm-values.yaml: want config.jetstream.enabled and config.merge.max_payload << 8MB >>")
	}

	names := func(kind string) map[string]bool {
		m := map[string]bool{}
		for _, d := range kinds[kind] {
			m[fmt.Sprint(get(d, "metadata", "name"))] = true
		}
		return m
	}
	pvcs, configMaps := names("PersistentVolumeClaim"), names("ConfigMap")
	// Created by hand once the coordinator has started (see config.yaml).
	configMaps["linearpatch-run-id"] = true

	var runCfg map[string]any
	for _, cm := range kinds["ConfigMap"] {
		if s, ok := get(cm, "data", "run.yaml").(string); ok {
			runCfg = yamlDocs(t, "ConfigMap linearpatch-run run.yaml", []byte(s))[0]
		}
	}
	if runCfg == nil {
		t.Fatal("no ConfigMap with run.yaml")
	}
	checkConfigKeys(t, "kubernetes ConfigMap run.yaml", "coordinator", runCfg)
	checkRunConfig(t, "kubernetes ConfigMap run.yaml", runCfg)

	workloads := append(append(slices.Clone(kinds["Job"]), kinds["Deployment"]...), kinds["StatefulSet"]...)
	roles := map[string]bool{}
	for _, w := range workloads {
		name := fmt.Sprint(get(w, "metadata", "name"))
		pod := get(w, "spec", "template", "spec")
		for _, v := range asList(get(pod, "volumes")) {
			if c, ok := get(v, "persistentVolumeClaim", "claimName").(string); ok && !pvcs[c] {
				t.Errorf("%s: volume claims %s, which is not defined", name, c)
			}
			if c, ok := get(v, "configMap", "name").(string); ok && !configMaps[c] {
				t.Errorf("%s: ConfigMap %s is not defined", name, c)
			}
		}
		containers := append(asList(get(pod, "initContainers")), asList(get(pod, "containers"))...)
		for _, c := range containers {
			img, _ := get(c, "image").(string)
			if img != "linearpatch" {
				continue
			}
			cmd := strs(get(c, "command"))
			if len(cmd) > 0 && filepath.Base(cmd[0]) != "linearpatch" {
				continue // a shell step, not the CLI
			}
			args := append(cmd[min(len(cmd), 1):], strs(get(c, "args"))...)
			where := fmt.Sprintf("%s container %v", name, get(c, "name"))
			checkArgs(t, where, args)
			if len(args) == 0 {
				continue
			}
			sub := args[0]
			roles[sub] = true
			env := map[string]bool{}
			for _, e := range asList(get(c, "env")) {
				n := fmt.Sprint(get(e, "name"))
				env[n] = true
				checkEnv(t, where, sub, n)
				if cm, ok := get(e, "valueFrom", "configMapKeyRef", "name").(string); ok && !configMaps[cm] {
					t.Errorf("%s: ConfigMap %s is not defined", where, cm)
				}
			}
			if sub == "coordinator" || sub == "teacher" || sub == "cache" || sub == "student" {
				checkMetricsScrape(t, where, w, c)
			}
			switch sub {
			case "teacher":
				if !env["LINEARPATCH_THREADS"] || !env["LINEARPATCH_RUN"] || !env["LINEARPATCH_NATS"] {
					t.Errorf("%s: want LINEARPATCH_THREADS, LINEARPATCH_RUN and LINEARPATCH_NATS", where)
				}
				for _, m := range asList(get(c, "volumeMounts")) {
					if get(m, "mountPath") == "/models" && get(m, "readOnly") != true {
						t.Errorf("%s: the model is not mounted read-only", where)
					}
				}
				checkWorkerArgs(t, where, args, runCfg)
			case "cache":
				if get(w, "spec", "replicas") != 1 || get(w, "spec", "strategy", "type") != "Recreate" {
					t.Errorf("%s: the cache writer needs replicas 1 and strategy Recreate", where)
				}
				checkWorkerArgs(t, where, args, runCfg)
			case "coordinator":
				if get(w, "kind") != "Job" {
					t.Errorf("%s: the coordinator runs as a Job", where)
				}
			}
		}
	}
	for _, r := range []string{"coordinator", "teacher", "cache", "student"} {
		if !roles[r] {
			t.Errorf("no container runs linearpatch %s", r)
		}
	}
}

// checkMetricsScrape checks that a long-running worker container c of workload w serves its
// metrics (LINEARPATCH_METRICS_LISTEN or --metrics-listen on a port), declares that port as
// the container port named metrics, and that w's pods carry the prometheus.io annotations
// naming it.
func checkMetricsScrape(t *testing.T, where string, w, c any) {
	t.Helper()
	listen := ""
	for _, e := range asList(get(c, "env")) {
		if get(e, "name") == "LINEARPATCH_METRICS_LISTEN" {
			listen = fmt.Sprint(get(e, "value"))
		}
	}
	args := strs(get(c, "args"))
	for i, a := range args {
		if a == "--metrics-listen" && i+1 < len(args) {
			listen = args[i+1]
		} else if v, ok := strings.CutPrefix(a, "--metrics-listen="); ok {
			listen = v
		}
	}
	if listen == "" {
		t.Errorf("%s: serves no metrics (no LINEARPATCH_METRICS_LISTEN or --metrics-listen)", where)
		return
	}
	host, port, err := net.SplitHostPort(listen)
	if err != nil || atoi(port) <= 0 {
		t.Errorf("%s: metrics listen address %q: want HOST:PORT", where, listen)
		return
	}
	if host == "127.0.0.1" || host == "localhost" {
		t.Errorf("%s: metrics listen on %s cannot be scraped from outside the pod", where, listen)
	}
	declared := false
	for _, p := range asList(get(c, "ports")) {
		if get(p, "name") == "metrics" && fmt.Sprint(get(p, "containerPort")) == port {
			declared = true
		}
	}
	if !declared {
		t.Errorf("%s: no container port named metrics with containerPort %s", where, port)
	}
	ann := get(w, "spec", "template", "metadata", "annotations")
	if get(ann, "prometheus.io/scrape") != "true" || fmt.Sprint(get(ann, "prometheus.io/port")) != port || get(ann, "prometheus.io/path") != "/metrics" {
		t.Errorf("%s: pod annotations %v: want prometheus.io/scrape \"true\", prometheus.io/port %q, prometheus.io/path /metrics", where, ann, port)
	}
}

func atoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}

func asList(v any) []any {
	l, _ := v.([]any)
	return l
}

// ---- systemd ----

type unit map[string][][2]string // section → key/value pairs in order

func parseUnit(t *testing.T, path string) unit {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	u := unit{}
	section := ""
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line
			u[section] = u[section]
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Errorf("%s:%d: not a key=value line in a section: %q", path, n, line)
				continue
			}
			u[section] = append(u[section], [2]string{strings.TrimSpace(k), strings.TrimSpace(v)})
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return u
}

func (u unit) values(section, key string) []string {
	var out []string
	for _, kv := range u[section] {
		if kv[0] == key {
			out = append(out, kv[1])
		}
	}
	return out
}

func TestSystemdUnits(t *testing.T) {
	paths := files(t, "systemd", ".service")
	want := []string{"systemd/linearpatch-cache.service", "systemd/linearpatch-coordinator.service", "systemd/linearpatch-student.service", "systemd/linearpatch-teacher@.service", "systemd/nats-server.service"}
	if !slices.Equal(paths, want) {
		t.Fatalf("units %v, want %v", paths, want)
	}
	for _, path := range paths {
		u := parseUnit(t, path)
		for _, s := range []string{"[Unit]", "[Service]", "[Install]"} {
			if _, ok := u[s]; !ok {
				t.Errorf("%s: no %s section", path, s)
			}
		}
		execStart := u.values("[Service]", "ExecStart")
		if len(execStart) != 1 {
			t.Errorf("%s: %d ExecStart lines", path, len(execStart))
			continue
		}
		fields := strings.Fields(execStart[0])
		if !strings.HasSuffix(fields[0], "/linearpatch") && !strings.HasSuffix(fields[0], "/nats-server") {
			t.Errorf("%s: ExecStart %q runs neither linearpatch nor nats-server", path, execStart[0])
		}
		if strings.HasSuffix(fields[0], "/linearpatch") {
			checkArgs(t, path+" ExecStart", fields[1:])
		}
		for key, val := range map[string]string{"NoNewPrivileges": "true", "ProtectSystem": "strict", "Restart": "on-failure"} {
			if v := u.values("[Service]", key); len(v) != 1 || v[0] != val {
				t.Errorf("%s: %s=%v, want %s", path, key, v, val)
			}
		}
		if len(u.values("[Install]", "WantedBy")) == 0 {
			t.Errorf("%s: no WantedBy", path)
		}
		base := filepath.Base(path)
		if strings.HasPrefix(base, "linearpatch-") {
			envFiles := u.values("[Service]", "EnvironmentFile")
			if len(envFiles) == 0 || !strings.HasPrefix(strings.TrimPrefix(envFiles[0], "-"), "/etc/linearpatch/") {
				t.Errorf("%s: EnvironmentFile %v, want /etc/linearpatch/...", path, envFiles)
			}
			if base == "linearpatch-teacher@.service" && !slices.Contains(envFiles, "-/etc/linearpatch/%i.env") {
				t.Errorf("%s: no per-instance EnvironmentFile /etc/linearpatch/%%i.env", path)
			}
			if base != "linearpatch-teacher@.service" && !slices.Contains(u.values("[Service]", "ReadWritePaths"), "/var/lib/linearpatch") {
				t.Errorf("%s: no ReadWritePaths=/var/lib/linearpatch for the run directory", path)
			}
		}
	}

	// The example environment files: every LINEARPATCH_ variable is a flag of its unit's
	// subcommand.
	envSub := map[string]string{"coordinator.env": "coordinator", "cache.env": "cache", "teacher.env": "teacher", "node1-a.env": "teacher", "student.env": "student"}
	envs := files(t, "systemd/env", ".env")
	if len(envs) != len(envSub) {
		t.Errorf("environment files %v, want %v", envs, envSub)
	}
	for _, path := range envs {
		sub := envSub[filepath.Base(path)]
		if sub == "" {
			t.Errorf("%s: which unit reads it? (add it to envSub)", path)
			continue
		}
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		for n, line := range strings.Split(string(data), "\n") {
			line = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(line), "#"))
			k, _, ok := strings.Cut(line, "=")
			if ok && strings.HasPrefix(k, "LINEARPATCH_") && !strings.ContainsAny(k, " \t") {
				checkEnv(t, fmt.Sprintf("%s:%d", path, n+1), sub, k)
			}
		}
	}
}

// ---- README ----

// lpCommand matches a linearpatch command: the binary at the start of a line (after
// VAR=value assignments), after " -- " (kubectl exec) or as a path (bin/linearpatch).
var lpCommand = regexp.MustCompile(`(?:^\s*(?:[A-Z_][A-Z0-9_]*=\S*\s+)*|\s--\s+|/)linearpatch\s+([a-z][a-z0-9-]*)(.*)`)

// TestReadmeCommands checks every `linearpatch <subcommand> --flag` in the shell blocks of
// README.md.
func TestReadmeCommands(t *testing.T) {
	data, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	inBlock, cont := false, ""
	found := 0
	for n, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "```") {
			inBlock, cont = !inBlock, ""
			continue
		}
		if !inBlock {
			continue
		}
		// Join continuation lines.
		if strings.HasSuffix(line, "\\") {
			cont += strings.TrimSuffix(line, "\\") + " "
			continue
		}
		line, cont = cont+line, ""
		if strings.HasPrefix(strings.TrimSpace(line), "#") {
			continue
		}
		m := lpCommand.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		rest := m[2]
		if i := strings.IndexAny(rest, "|;&>)#"); i >= 0 {
			rest = rest[:i]
		}
		found++
		checkArgs(t, fmt.Sprintf("README.md:%d", n+1), append([]string{m[1]}, strings.Fields(rest)...))
	}
	if found < 5 {
		t.Errorf("README.md: only %d linearpatch commands found", found)
	}
	t.Logf("README.md: %d linearpatch commands checked", found)
}
