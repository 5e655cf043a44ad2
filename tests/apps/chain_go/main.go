// A Go service for the runtimes causality scenario (uninstrumented; net/http, stdlib only).
//
//	chain_go PORT DOWNSTREAM_BASE_URL PREFIX
//
// GET /<anything>/<id> calls DOWNSTREAM/PREFIX/<derive(id)> through a pooled keep-alive client,
// then answers. derive is the scenario's id function: the downstream request shares nothing
// with the incoming one that the agent could match.
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

func derive(id uint64) uint64 { return (id*7919 + 13) % 1000003 }

func main() {
	port, downstream, prefix := os.Args[1], os.Args[2], os.Args[3]
	client := &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{MaxIdleConnsPerHost: 64, MaxConnsPerHost: 64},
	}
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		parts := strings.Split(strings.TrimSuffix(r.URL.Path, "/"), "/")
		id, err := strconv.ParseUint(parts[len(parts)-1], 10, 64)
		if err != nil {
			http.Error(w, "bad id", 400)
			return
		}
		resp, err := client.Get(fmt.Sprintf("%s/%s/%d", downstream, prefix, derive(id)))
		if err != nil {
			http.Error(w, err.Error(), 502)
			return
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.Write(body)
	})
	if err := http.ListenAndServe("127.0.0.1:"+port, nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
