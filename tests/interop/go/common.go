// The interop test protocol (docs/interop.md, tests/interop/protocol.py),
// shared by the grpc-go backend and client driver: raw-bytes messages, the
// method names, metadata keys and JSON helpers.
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"unicode/utf8"

	"google.golang.org/grpc/metadata"
)

const (
	methodUnary        = "/interop.Echo/Unary"
	methodServerStream = "/interop.Echo/ServerStream"
	methodClientStream = "/interop.Echo/ClientStream"
	methodBidi         = "/interop.Echo/Bidi"
	methodReport       = "/interop.Control/Report"

	maxMessageBytes = 64 << 20
	// Appended to x-fail-details in the status details: non-ASCII and a '%'
	// make every implementation percent-encode grpc-message.
	detailsSuffix = " \u2717 100%"
	// A received message is reported with its text when it is at most this long.
	maxTextBytes = 64 << 10
)

// rawCodec passes messages through as bytes: a *[]byte (or []byte) is the
// whole message. Registered under "proto" (the default codec) and forced on
// every call and on the server, so no generated code is needed.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) {
	switch m := v.(type) {
	case *[]byte:
		return *m, nil
	case []byte:
		return m, nil
	}
	return nil, fmt.Errorf("rawCodec: cannot marshal %T", v)
}

func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	p, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawCodec: cannot unmarshal into %T", v)
	}
	*p = append([]byte(nil), data...) // the transport reuses its buffer
	return nil
}

func (rawCodec) Name() string   { return "proto" }
func (rawCodec) String() string { return "proto" }

// failBlob is the value of the x-fail-blob-bin trailer: every byte value.
func failBlob() []byte {
	b := make([]byte, 256)
	for i := range b {
		b[i] = byte(i)
	}
	return b
}

// pattern is a deterministic payload: byte i is (i + seed) mod 256.
func pattern(size, seed int) []byte {
	b := make([]byte, size)
	for i := range b {
		b[i] = byte(i + seed)
	}
	return b
}

func isBinKey(key string) bool { return strings.HasSuffix(key, "-bin") }

// mdJSON renders metadata as key -> values, -bin values hex-encoded.
func mdJSON(md metadata.MD) map[string][]string {
	out := map[string][]string{}
	for key, values := range md {
		rendered := make([]string, 0, len(values))
		for _, v := range values {
			if isBinKey(key) {
				v = hex.EncodeToString([]byte(v))
			}
			rendered = append(rendered, v)
		}
		out[key] = rendered
	}
	return out
}

type messageInfo struct {
	Len    int     `json:"len"`
	SHA256 string  `json:"sha256"`
	Text   *string `json:"text,omitempty"`
}

func describe(b []byte) messageInfo {
	sum := sha256.Sum256(b)
	info := messageInfo{Len: len(b), SHA256: hex.EncodeToString(sum[:])}
	if len(b) <= maxTextBytes && utf8.Valid(b) {
		text := string(b)
		info.Text = &text
	}
	return info
}

func first(md metadata.MD, key string) string {
	if values := md.Get(key); len(values) > 0 {
		return values[0]
	}
	return ""
}

func intValue(md metadata.MD, key string, fallback int) int {
	v := first(md, key)
	if v == "" {
		return fallback
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		return fallback
	}
	return n
}

// emit prints one JSON line on stdout.
func emit(v interface{}) {
	line, err := json.Marshal(v)
	if err != nil {
		line, _ = json.Marshal(map[string]string{"fatal": err.Error()})
	}
	os.Stdout.Write(append(line, '\n'))
}
