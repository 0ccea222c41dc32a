// The grpc-go backend of the interop protocol.
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const maxRecordedCalls = 20000

type callRecord struct {
	Method   string `json:"method"`
	State    string `json:"state"` // active, ok, failed, cancelled
	Received int    `json:"received"`
	Reason   string `json:"reason,omitempty"`
	LBToken  string `json:"lb_token,omitempty"`
}

type backend struct {
	name string

	mu     sync.Mutex
	total  int
	active int
	calls  map[string]*callRecord
}

func (b *backend) begin(method string, md metadata.MD) *callRecord {
	rec := &callRecord{Method: method, State: "active", LBToken: first(md, "lb-token")}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.total++
	b.active++
	if id := first(md, "x-call-id"); id != "" && len(b.calls) < maxRecordedCalls {
		b.calls[id] = rec
	}
	return rec
}

func (b *backend) received(rec *callRecord) {
	b.mu.Lock()
	rec.Received++
	b.mu.Unlock()
}

func (b *backend) finish(rec *callRecord, state, reason string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.active--
	rec.State = state
	rec.Reason = reason
}

func (b *backend) report() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	out, _ := json.Marshal(map[string]interface{}{
		"name":   b.name,
		"impl":   "go",
		"pid":    os.Getpid(),
		"total":  b.total,
		"active": b.active,
		"calls":  b.calls,
	})
	return out
}

// cancelledError marks a handler that stopped because its call was cancelled
// (client cancel, deadline, connection gone): the status is not sent anyway.
type cancelledError struct{ err error }

func (e cancelledError) Error() string { return e.err.Error() }

type serverCall struct {
	b      *backend
	stream grpc.ServerStream
	md     metadata.MD
	rec    *callRecord
}

func (c *serverCall) recv() ([]byte, error) {
	var m []byte
	if err := c.stream.RecvMsg(&m); err != nil {
		if err == io.EOF {
			return nil, err
		}
		return nil, cancelledError{err}
	}
	c.b.received(c.rec)
	return m, nil
}

func (c *serverCall) send(m []byte) error {
	if err := c.stream.SendMsg(&m); err != nil {
		return cancelledError{err}
	}
	return nil
}

func (c *serverCall) sleep(ms int) error {
	if ms <= 0 {
		return nil
	}
	timer := time.NewTimer(time.Duration(ms) * time.Millisecond)
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-c.stream.Context().Done():
		return cancelledError{c.stream.Context().Err()}
	}
}

func (c *serverCall) headers() metadata.MD {
	h := metadata.Pairs("x-backend", c.b.name)
	for key, values := range c.md {
		if strings.HasPrefix(key, "x-md-") {
			h[key] = append(h[key], values...)
		}
	}
	return h
}

func (c *serverCall) trailers() metadata.MD {
	t := metadata.Pairs("x-served-by", c.b.name)
	for key, values := range c.md {
		if strings.HasPrefix(key, "x-md-") {
			name := "x-trailer-" + strings.TrimPrefix(key, "x-md-")
			t[name] = append(t[name], values...)
		}
	}
	return t
}

// failure is the status asked for by x-fail, with its trailing metadata.
func (c *serverCall) failure(code int) error {
	details := first(c.md, "x-fail-details")
	c.stream.SetTrailer(metadata.Pairs("x-fail-why", details, "x-fail-blob-bin", string(failBlob())))
	return status.Error(codes.Code(code), details+detailsSuffix)
}

func (c *serverCall) run(method string) error {
	c.stream.SetTrailer(c.trailers())
	if err := c.sleep(intValue(c.md, "x-sleep-ms", 0)); err != nil {
		return err
	}
	failCode := intValue(c.md, "x-fail", -1)
	if failCode >= 0 && first(c.md, "x-trailers-only") == "1" {
		if first(c.md, "x-read-first") == "1" {
			for {
				if _, err := c.recv(); err == io.EOF {
					break
				} else if err != nil {
					return err
				}
			}
		}
		return c.failure(failCode) // nothing sent: a trailers-only answer
	}
	if err := c.stream.SetHeader(c.headers()); err != nil {
		return err
	}
	sendHeader := func() error {
		if err := c.stream.SendHeader(nil); err != nil {
			return cancelledError{err}
		}
		return nil
	}
	switch method {
	case methodUnary:
		m, err := c.recv()
		if err != nil {
			return c.missing(err)
		}
		if failCode >= 0 {
			if err := sendHeader(); err != nil {
				return err
			}
			return c.failure(failCode)
		}
		return c.send(m)
	case methodServerStream:
		m, err := c.recv()
		if err != nil {
			return c.missing(err)
		}
		count := intValue(c.md, "x-count", 3)
		interval := intValue(c.md, "x-interval-ms", 0)
		for i := 0; i < count; i++ {
			if i > 0 {
				if err := c.sleep(interval); err != nil {
					return err
				}
			}
			if err := c.send(m); err != nil {
				return err
			}
		}
		if failCode >= 0 {
			if count == 0 {
				if err := sendHeader(); err != nil {
					return err
				}
			}
			return c.failure(failCode)
		}
		return nil
	case methodClientStream:
		var sums []string
		total := 0
		for {
			m, err := c.recv()
			if err == io.EOF {
				break
			}
			if err != nil {
				return err
			}
			sum := sha256.Sum256(m)
			sums = append(sums, hex.EncodeToString(sum[:]))
			total += len(m)
		}
		if failCode >= 0 {
			if err := sendHeader(); err != nil {
				return err
			}
			return c.failure(failCode)
		}
		if sums == nil {
			sums = []string{}
		}
		summary, _ := json.Marshal(map[string]interface{}{
			"backend": c.b.name, "count": len(sums), "bytes": total, "sha256": sums,
		})
		return c.send(summary)
	case methodBidi:
		sent := false
		for {
			m, err := c.recv()
			if err == io.EOF {
				break
			}
			if err != nil {
				return err
			}
			if err := c.send(m); err != nil {
				return err
			}
			sent = true
		}
		// A client that cancels may half-close first (grpc-js ends the
		// stream, then resets it): the reset lands during this pause.
		if err := c.sleep(50); err != nil {
			return err
		}
		if failCode >= 0 {
			if !sent {
				if err := sendHeader(); err != nil {
					return err
				}
			}
			return c.failure(failCode)
		}
		return nil
	}
	return status.Errorf(codes.Unimplemented, "unknown method %s", method)
}

// missing: a unary or server-streaming request stream without its message.
func (c *serverCall) missing(err error) error {
	if err == io.EOF {
		return status.Error(codes.InvalidArgument, "no request message")
	}
	return err
}

func (b *backend) handler(method string) grpc.StreamHandler {
	return func(_ interface{}, stream grpc.ServerStream) error {
		md, _ := metadata.FromIncomingContext(stream.Context())
		rec := b.begin(method, md)
		c := &serverCall{b: b, stream: stream, md: md, rec: rec}
		err := c.run(method)
		var ce cancelledError
		switch {
		case err == nil:
			b.finish(rec, "ok", "")
		case asCancelled(err, &ce):
			b.finish(rec, "cancelled", ce.Error())
			if ctxErr := stream.Context().Err(); ctxErr != nil {
				// As generated servers do: DEADLINE_EXCEEDED or CANCELLED.
				return status.FromContextError(ctxErr).Err()
			}
		default:
			b.finish(rec, "failed", status.Convert(err).Message())
		}
		return err
	}
}

func asCancelled(err error, target *cancelledError) bool {
	ce, ok := err.(cancelledError)
	if ok {
		*target = ce
	}
	return ok
}

func (b *backend) reportHandler(_ interface{}, stream grpc.ServerStream) error {
	var req []byte
	if err := stream.RecvMsg(&req); err != nil {
		return err
	}
	out := b.report()
	return stream.SendMsg(&out)
}

func serve(name string, host string, port int, grace time.Duration) error {
	b := &backend{name: name, calls: map[string]*callRecord{}}
	server := grpc.NewServer(
		grpc.CustomCodec(rawCodec{}),
		grpc.MaxRecvMsgSize(maxMessageBytes),
		grpc.MaxSendMsgSize(maxMessageBytes),
	)
	desc := func(service string, methods map[string]grpc.StreamHandler) *grpc.ServiceDesc {
		d := &grpc.ServiceDesc{ServiceName: service, HandlerType: (*interface{})(nil)}
		for methodName, h := range methods {
			d.Streams = append(d.Streams, grpc.StreamDesc{
				StreamName: methodName, Handler: h, ServerStreams: true, ClientStreams: true,
			})
		}
		return d
	}
	server.RegisterService(desc("interop.Echo", map[string]grpc.StreamHandler{
		"Unary":        b.handler(methodUnary),
		"ServerStream": b.handler(methodServerStream),
		"ClientStream": b.handler(methodClientStream),
		"Bidi":         b.handler(methodBidi),
	}), struct{}{})
	server.RegisterService(desc("interop.Control", map[string]grpc.StreamHandler{
		"Report": b.reportHandler,
	}), struct{}{})

	listener, err := net.Listen("tcp", net.JoinHostPort(host, fmt.Sprint(port)))
	if err != nil {
		return err
	}
	emit(map[string]interface{}{
		"event": "listening", "impl": "go", "name": name,
		"port": listener.Addr().(*net.TCPAddr).Port, "pid": os.Getpid(),
	})

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	stopped := make(chan bool, 1)
	go func() {
		<-signals
		b.mu.Lock()
		active := b.active
		b.mu.Unlock()
		emit(map[string]interface{}{"event": "stopping", "active": active})
		done := make(chan struct{})
		go func() {
			server.GracefulStop() // GOAWAY, then waits for the running calls
			close(done)
		}()
		select {
		case <-done:
			stopped <- true
		case <-time.After(grace):
			server.Stop()
			stopped <- false
		}
	}()
	if err := server.Serve(listener); err != nil {
		return err
	}
	graceful := <-stopped
	b.mu.Lock()
	total := b.total
	b.mu.Unlock()
	emit(map[string]interface{}{"event": "stopped", "graceful": graceful, "total": total})
	return nil
}
