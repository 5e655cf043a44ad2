// An HTTPS server and client in one Go program (crypto/tls, net/http; stdlib only). Over TLS
// Go's client and server agree on HTTP/2 through ALPN. The client makes one request before
// "ready" (the program is running, its libraries loaded, before the agent starts), then on a
// line from stdin the test's requests on a new connection, "done", and it exits on the next
// line. (A connection whose reader was already blocked in Read when the agent attached loses
// the data that read returns: its entry was never seen.)
//
//	tls_go CERT KEY PORT
package main

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
)

func main() {
	cert, key, port := os.Args[1], os.Args[2], os.Args[3]
	addr := "127.0.0.1:" + port
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		if !strings.HasPrefix(r.URL.Path, "/users/") {
			w.WriteHeader(404)
			return
		}
		w.Header().Set("content-type", "application/json")
		w.Write([]byte(`{"ok":true}`))
	})
	srv := &http.Server{Addr: addr, Handler: mux}
	go func() {
		if err := srv.ListenAndServeTLS(cert, key); err != nil {
			fmt.Println("server:", err)
			os.Exit(1)
		}
	}()
	client := &http.Client{Transport: &http.Transport{
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true},
		ForceAttemptHTTP2: true,
	}}
	get := func(path string, headers map[string]string) int {
		req, _ := http.NewRequest("GET", "https://"+addr+path, nil)
		for k, v := range headers {
			req.Header.Set(k, v)
		}
		for {
			resp, err := client.Do(req)
			if err != nil {
				if strings.Contains(err.Error(), "connection refused") {
					continue
				}
				fmt.Println("client:", err)
				os.Exit(1)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			return resp.StatusCode
		}
	}
	get("/warmup", nil)
	fmt.Println("ready")
	in := bufio.NewReader(os.Stdin)
	in.ReadString('\n')
	client.CloseIdleConnections()
	codes := []int{
		get("/users/1", nil),
		get("/users/2", map[string]string{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}),
		get("/users/3", map[string]string{"authorization": "Bearer PLANTED-SECRET-7f3a"}),
	}
	for _, c := range codes {
		if c != 200 {
			fmt.Println("failed", codes)
			os.Exit(1)
		}
	}
	fmt.Println("done")
	in.ReadString('\n')
}
