// The baseline of benchmarks/grpc.py: go-plugin's own Go host calling the KV plugin binary, as
// go-plugin 1.0.1's gRPC example host does (plugin.NewClient with the example's handshake and
// plugin map, gRPC only, Dispense("kv_grpc") as shared.KV), with no sandbox.
//
// It measures what the Python side measures of sandboxer: the start to the first answered Get
// (NewClient, Client, Dispense, Put, Get), Get latency one call after another, and Get
// throughput with -in-flight goroutines each calling one after another. It prints one JSON
// line on stdout and nothing else there; any error exits 1 with the reason on stderr.
//
// With -serve-starts (benchmarks/startup.py) it measures only the start, one per line read
// from stdin, each answered with one JSON line, so the parent can interleave them with its own
// measurements in one long-lived process; it exits at the end of its input.
//
// Arguments after the flags are a wrapper the plugin runs under: the plugin's command is
// WRAPPER... BINARY (benchmarks/startup.py runs it under bwrap that way).
//
// Built offline in GOPATH mode beside the example (tests/grpc_build.py, build_go_host), so
// it imports the example's shared package and the same go-plugin, grpc and protobuf sources
// the plugin is built from.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"

	"example.com/grpc-kv-go/shared"
)

var value = []byte("hi") // what the Python side puts: {"key": "a", "value": "aGk="}

type started struct {
	client *plugin.Client
	kv     shared.KV
}

// start is the span measured as "start to first answered call": the process started and its
// handshake read (Client), the KV dispensed, then one Put and one Get answered. The plugin's
// command is argv: its binary, or a wrapper's argv ending with the binary.
func start(argv []string) (*started, error) {
	binary := argv[len(argv)-1]
	client := plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  shared.Handshake,
		Plugins:          shared.PluginMap,
		Cmd:              exec.Command(argv[0], argv[1:]...),
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		// go-plugin's default logger writes every line at trace level to stderr; only
		// warnings here (none per call either way).
		Logger: hclog.New(&hclog.LoggerOptions{Name: "plugin", Output: os.Stderr, Level: hclog.Warn}),
	})
	rpcClient, err := client.Client()
	if err != nil {
		client.Kill()
		return nil, fmt.Errorf("starting %s: %w", binary, err)
	}
	raw, err := rpcClient.Dispense("kv_grpc")
	if err != nil {
		client.Kill()
		return nil, fmt.Errorf("dispensing kv_grpc: %w", err)
	}
	kv := raw.(shared.KV)
	if err := kv.Put("a", value); err != nil {
		client.Kill()
		return nil, fmt.Errorf("first Put: %w", err)
	}
	if err := get(kv); err != nil {
		client.Kill()
		return nil, fmt.Errorf("first Get: %w", err)
	}
	return &started{client: client, kv: kv}, nil
}

func get(kv shared.KV) error {
	got, err := kv.Get("a")
	if err != nil {
		return err
	}
	if !bytes.Equal(got, value) {
		return fmt.Errorf("Get answered %q, not %q", got, value)
	}
	return nil
}

func summary(samples []int64) map[string]float64 {
	s := append([]int64(nil), samples...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	n := len(s)
	pct := func(p float64) float64 {
		i := int(p * float64(n))
		if i > n-1 {
			i = n - 1
		}
		return float64(s[i]) / 1000
	}
	var sum int64
	for _, v := range s {
		sum += v
	}
	return map[string]float64{"n": float64(n), "p50_us": pct(0.50), "p90_us": pct(0.90),
		"p99_us": pct(0.99), "min_us": float64(s[0]) / 1000,
		"mean_us": float64(sum) / float64(n) / 1000}
}

// cpuNs is the CPU (user + system, all threads) this process has used: the host's side alone.
func cpuNs() int64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return ru.Utime.Nano() + ru.Stime.Nano()
}

// timedStart is one start to the first answered call, in milliseconds; the plugin is killed
// after (not timed).
func timedStart(argv []string) (float64, error) {
	t0 := time.Now()
	s, err := start(argv)
	if err != nil {
		return 0, err
	}
	elapsed := time.Since(t0)
	s.client.Kill()
	return float64(elapsed.Microseconds()) / 1000, nil
}

// serveStarts answers each line of stdin with one timed start, as {"first_call_ms": ms}; the
// parent decides which starts count (it discards the first, as run does).
func serveStarts(argv []string) error {
	in := bufio.NewScanner(os.Stdin)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		ms, err := timedStart(argv)
		if err != nil {
			return err
		}
		if err := out.Encode(map[string]float64{"first_call_ms": ms}); err != nil {
			return err
		}
	}
	return in.Err()
}

func run(argv []string, starts, warmup, sequential, pipelined, inFlight int) (map[string]interface{}, error) {
	// Start to first answered call: the first start is not timed (it pays for the page cache
	// and this process's first gRPC connection), as on the Python side.
	var firstCall []float64
	for i := 0; i <= starts; i++ {
		ms, err := timedStart(argv)
		if err != nil {
			return nil, err
		}
		if i > 0 {
			firstCall = append(firstCall, ms)
		}
	}

	s, err := start(argv)
	if err != nil {
		return nil, err
	}
	defer s.client.Kill()
	for i := 0; i < warmup; i++ {
		if err := get(s.kv); err != nil {
			return nil, err
		}
	}
	// gc off in the measured loops, as the Python side disables its collector.
	runtime.GC()
	gcPercent := debug.SetGCPercent(-1)
	samples := make([]int64, sequential)
	seqCPU := cpuNs()
	for i := range samples {
		t0 := time.Now()
		if err := get(s.kv); err != nil {
			return nil, err
		}
		samples[i] = time.Since(t0).Nanoseconds()
	}
	seqCPU = cpuNs() - seqCPU

	per := pipelined / inFlight
	errs := make(chan error, inFlight)
	var wg sync.WaitGroup
	pipeCPU := cpuNs()
	t0 := time.Now()
	for w := 0; w < inFlight; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < per; i++ {
				if err := get(s.kv); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(t0)
	pipeCPU = cpuNs() - pipeCPU
	debug.SetGCPercent(gcPercent)
	close(errs)
	if err := <-errs; err != nil {
		return nil, err
	}
	calls := per * inFlight
	seq := summary(samples)
	seq["client_cpu_us_per_call"] = float64(seqCPU) / float64(sequential) / 1000
	return map[string]interface{}{
		"go":            runtime.Version(),
		"gomaxprocs":    runtime.GOMAXPROCS(0),
		"first_call_ms": firstCall,
		"sequential":    seq,
		"samples_ns":    samples,
		"pipelined": map[string]interface{}{
			"in_flight": inFlight, "calls": calls, "seconds": elapsed.Seconds(),
			"throughput_calls_per_s": float64(calls) / elapsed.Seconds(),
			"client_cpu_us_per_call": float64(pipeCPU) / float64(calls) / 1000,
		},
	}, nil
}

func main() {
	binary := flag.String("plugin", "", "the KV plugin binary")
	starts := flag.Int("starts", 3, "timed starts to the first answered Get")
	warmup := flag.Int("warmup", 1000, "untimed Gets before the sequential ones")
	sequential := flag.Int("sequential", 2000, "Gets timed one by one")
	pipelined := flag.Int("pipelined", 20000, "Gets with -in-flight goroutines")
	inFlight := flag.Int("in-flight", 64, "goroutines calling at once")
	serve := flag.Bool("serve-starts", false, "only timed starts, one per line of stdin, each answered with a JSON line")
	flag.Parse()
	if *binary == "" || *sequential < 1 || *inFlight < 1 || *pipelined < *inFlight {
		fmt.Fprintln(os.Stderr, "usage: grpc-host -plugin BINARY [-starts N] [-warmup N] [-sequential N] [-pipelined N] [-in-flight N] [WRAPPER...]\n"+
			"       grpc-host -plugin BINARY -serve-starts [WRAPPER...]")
		os.Exit(2)
	}
	argv := append(append([]string(nil), flag.Args()...), *binary)
	if *serve {
		if err := serveStarts(argv); err != nil {
			fmt.Fprintln(os.Stderr, "grpc-host:", err)
			os.Exit(1)
		}
		return
	}
	result, err := run(argv, *starts, *warmup, *sequential, *pipelined, *inFlight)
	if err != nil {
		fmt.Fprintln(os.Stderr, "grpc-host:", err)
		os.Exit(1)
	}
	line, err := json.Marshal(result)
	if err != nil {
		fmt.Fprintln(os.Stderr, "grpc-host:", err)
		os.Exit(1)
	}
	fmt.Println(string(line))
}
