// Package fakenats is a stand-in NATS server for tests: it speaks just enough of the
// protocol for a client to connect, announcing a chosen server version.
package fakenats

import (
	"bufio"
	"fmt"
	"net"
	"strings"
	"testing"
)

// Start listens on a loopback port until the test ends and returns its URL. Each client gets
// an INFO line announcing version (with JetStream and headers) and a PONG for every PING.
func Start(t testing.TB, version string) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	port := l.Addr().(*net.TCPAddr).Port
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				fmt.Fprintf(c, "INFO {\"server_id\":\"FAKE\",\"version\":%q,\"go\":\"go1.19\",\"host\":\"127.0.0.1\",\"port\":%d,\"max_payload\":1048576,\"proto\":1,\"headers\":true,\"jetstream\":true}\r\n", version, port)
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					if strings.HasPrefix(line, "PING") {
						fmt.Fprint(c, "PONG\r\n")
					}
				}
			}()
		}
	}()
	return fmt.Sprintf("nats://127.0.0.1:%d", port)
}
