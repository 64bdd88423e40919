// example.native-go: a native sandboxer plugin written in Go, built with
// `go build -buildmode=c-shared` into libgohello.so.
//
// It exports the C ABI of sandboxer's native kind (DESIGN section 4). cgo writes the
// prototypes into the generated header without `const` (char*, uint8_t*); that is the same
// calling convention as the ABI's `const char *` and `const uint8_t *`, and this code never
// writes through them.
//
//	greet(name) -> "Hello, NAME!"  (the greeting comes from init's config, default "Hello")
//	add(a, b)   -> a + b            (JSON numbers, float64)
//	crash()     -> a nil pointer dereference; the process dies by SIGABRT (see crash below)
//
// Result and error buffers are allocated with C.malloc, because the host holds them after
// this function returns and Go memory must not be retained by C; sandboxer_free releases
// them with C.free.
package main

/*
#include <stdint.h>
#include <stdlib.h>
*/
import "C"

import (
	"encoding/json"
	"fmt"
	"sync"
	"unsafe"
)

// rpcError is the error object of the ABI: {"code": int, "message": str}.
type rpcError struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
}

func (e *rpcError) Error() string { return e.Message }

const (
	invalidParams  = -32602
	methodNotFound = -32601
	internalError  = -32603
)

var (
	mu       sync.Mutex // the ABI does not promise one caller at a time; be safe anyway
	greeting = "Hello"
)

// methodList is handed out by sandboxer_methods: allocated once, never freed, as the ABI's
// "static string" requires.
var methodList = C.CString(`["greet","add","crash"]`)

func greet(args []json.RawMessage) (any, *rpcError) {
	var name string
	if len(args) != 1 || json.Unmarshal(args[0], &name) != nil {
		return nil, &rpcError{invalidParams, "greet takes one argument: a name (string)"}
	}
	mu.Lock()
	defer mu.Unlock()
	return greeting + ", " + name + "!", nil
}

func add(args []json.RawMessage) (any, *rpcError) {
	var a, b float64
	if len(args) != 2 || json.Unmarshal(args[0], &a) != nil || json.Unmarshal(args[1], &b) != nil {
		return nil, &rpcError{invalidParams, "add takes two arguments: numbers"}
	}
	return a + b, nil
}

type holder struct{ value *int }

// crash dereferences a nil pointer. Go turns that SIGSEGV into a runtime panic, and nothing
// recovers it (crash runs outside dispatch's recover on purpose). A program built with
// -buildmode=c-shared does not exit(2) on an unrecovered panic as a Go executable would:
// "when C owns the process" the runtime forces GOTRACEBACK=crash, so it prints
// "panic: runtime error: invalid memory address or nil pointer dereference [signal SIGSEGV
// ...]" and the goroutine trace to stderr, then raises SIGABRT. The host process dies by
// signal 6 (returncode -6), not 11.
func crash() {
	var h *holder
	*h.value = 42
}

func dispatch(method string, raw []byte) (result any, rerr *rpcError) {
	defer func() {
		// A bug in a method (not crash) answers an internal error instead of killing the host.
		if p := recover(); p != nil {
			result, rerr = nil, &rpcError{internalError, fmt.Sprintf("%s panicked: %v", method, p)}
		}
	}()
	var args []json.RawMessage
	if err := json.Unmarshal(raw, &args); err != nil {
		return nil, &rpcError{invalidParams, "arguments are not a valid JSON array: " + err.Error()}
	}
	switch method {
	case "greet":
		return greet(args)
	case "add":
		return add(args)
	default:
		return nil, &rpcError{methodNotFound, "no such method: " + method}
	}
}

// deliver copies data into C memory for the host; 0 on success.
func deliver(data []byte, out **C.uint8_t, outLen *C.size_t) bool {
	p := C.malloc(C.size_t(len(data)))
	if p == nil {
		return false
	}
	copy(unsafe.Slice((*byte)(p), len(data)), data)
	*out = (*C.uint8_t)(p)
	*outLen = C.size_t(len(data))
	return true
}

//export sandboxer_call
func sandboxer_call(method *C.char, args *C.uint8_t, argsLen C.size_t, out **C.uint8_t, outLen *C.size_t) C.int {
	if out == nil || outLen == nil {
		return 1
	}
	*out, *outLen = nil, 0
	name := C.GoString(method)
	if name == "crash" {
		crash()
	}
	raw := C.GoBytes(unsafe.Pointer(args), C.int(argsLen))
	result, rerr := dispatch(name, raw)
	status := C.int(0)
	var data []byte
	var err error
	if rerr == nil {
		data, err = json.Marshal(result)
	}
	if rerr != nil || err != nil {
		if rerr == nil {
			rerr = &rpcError{internalError, "result is not JSON: " + err.Error()}
		}
		status = 1
		data, _ = json.Marshal(rerr) // a struct of an int and a string always marshals
	}
	if !deliver(data, out, outLen) {
		return 1
	}
	return status
}

//export sandboxer_free
func sandboxer_free(ptr *C.uint8_t, length C.size_t) {
	C.free(unsafe.Pointer(ptr))
}

//export sandboxer_init
func sandboxer_init(config *C.uint8_t, length C.size_t) C.int {
	var cfg struct {
		Greeting *string `json:"greeting"`
	}
	if json.Unmarshal(C.GoBytes(unsafe.Pointer(config), C.int(length)), &cfg) != nil {
		return 2
	}
	if cfg.Greeting != nil {
		mu.Lock()
		greeting = *cfg.Greeting
		mu.Unlock()
	}
	return 0
}

//export sandboxer_health
func sandboxer_health() C.int { return 0 }

//export sandboxer_methods
func sandboxer_methods() *C.char { return methodList }

// main is required by -buildmode=c-shared and never runs.
func main() {}
