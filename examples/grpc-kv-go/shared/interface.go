// Package shared holds what a go-plugin host and the KV plugin agree on: the handshake, the
// plugin map and the KV interface, served and called over gRPC (grpc.go).
package shared

import (
	"context"

	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"

	"example.com/grpc-kv-go/proto"
)

// Handshake is a UX feature, not a security one: a host that sets BASIC_PLUGIN=hello in the
// plugin's environment is the only thing that makes the binary serve rather than refuse.
var Handshake = plugin.HandshakeConfig{
	ProtocolVersion:  1,
	MagicCookieKey:   "BASIC_PLUGIN",
	MagicCookieValue: "hello",
}

// PluginMap is the map of plugins a host can dispense.
var PluginMap = map[string]plugin.Plugin{
	"kv_grpc": &KVGRPCPlugin{},
}

// KV is the interface exposed as a plugin.
type KV interface {
	Put(key string, value []byte) error
	Get(key string) ([]byte, error)
}

// KVGRPCPlugin is the plugin.GRPCPlugin for KV: Impl is set on the plugin side only.
type KVGRPCPlugin struct {
	plugin.Plugin
	Impl KV
}

func (p *KVGRPCPlugin) GRPCServer(broker *plugin.GRPCBroker, s *grpc.Server) error {
	proto.RegisterKVServer(s, &GRPCServer{Impl: p.Impl})
	return nil
}

func (p *KVGRPCPlugin) GRPCClient(ctx context.Context, broker *plugin.GRPCBroker, c *grpc.ClientConn) (interface{}, error) {
	return &GRPCClient{client: proto.NewKVClient(c)}, nil
}
