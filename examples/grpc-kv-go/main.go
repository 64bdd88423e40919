// The KV plugin of go-plugin's gRPC example, for go-plugin 1.0.1 (Debian 12's). Upstream keeps
// the values in files named kv_<key>; here they stay in memory, so the plugin works in a sandbox
// whose filesystem is read-only.
package main

import (
	"fmt"
	"sync"

	"github.com/hashicorp/go-plugin"

	"example.com/grpc-kv-go/shared"
)

// KV is the real implementation of shared.KV.
type KV struct {
	mu     sync.Mutex
	values map[string][]byte
}

func (k *KV) Put(key string, value []byte) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.values[key] = append([]byte(nil), value...)
	return nil
}

func (k *KV) Get(key string) ([]byte, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	value, ok := k.values[key]
	if !ok {
		return nil, fmt.Errorf("no value for key %q", key)
	}
	return value, nil
}

func main() {
	plugin.Serve(&plugin.ServeConfig{
		HandshakeConfig: shared.Handshake,
		Plugins: map[string]plugin.Plugin{
			"kv_grpc": &shared.KVGRPCPlugin{Impl: &KV{values: map[string][]byte{}}},
		},

		// A non-nil value here enables gRPC serving for this plugin...
		GRPCServer: plugin.DefaultGRPCServer,
	})
}
