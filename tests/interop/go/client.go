// The grpc-go client driver: runs a plan (tests/interop/protocol.py) against
// a target and prints one JSON result line.
package main

import (
	"context"
	"encoding/hex"
	"io"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	_ "unsafe" // go:linkname

	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// grpc-go raises any client keepalive time under 10 s to 10 s; its own tests
// lower this variable, and so does the keepalive scenario (a 1 s ping).
//
//go:linkname keepaliveMinPingTime google.golang.org/grpc/internal.KeepaliveMinPingTime
var keepaliveMinPingTime time.Duration

type message struct {
	Text *string `json:"text,omitempty"`
	Size int     `json:"size,omitempty"`
	Seed int     `json:"seed,omitempty"`
}

func (m message) bytes() []byte {
	if m.Text != nil {
		return []byte(*m.Text)
	}
	return pattern(m.Size, m.Seed)
}

type callSpec struct {
	Name        string      `json:"name"`
	Method      string      `json:"method"`
	Metadata    [][2]string `json:"metadata"`
	Messages    []message   `json:"messages"`
	IntervalMs  int         `json:"interval_ms"`
	TimeoutMs   int         `json:"timeout_ms"`
	Pingpong    bool        `json:"pingpong"`
	HalfClose   *bool       `json:"half_close"`
	CancelAfter *int        `json:"cancel_after"`
	SleepMs     int         `json:"sleep_ms"` // a pause in the plan instead of a call
}

type plan struct {
	Mode       string     `json:"mode"`
	Parallel   bool       `json:"parallel"`
	WatchState bool       `json:"watch_state"`
	Calls      []callSpec `json:"calls"`
	Channel    struct {
		KeepaliveMs        int `json:"keepalive_ms"`
		KeepaliveTimeoutMs int `json:"keepalive_timeout_ms"`
	} `json:"channel"`
	// streams
	Streams   int    `json:"streams"`
	TimeoutMs int    `json:"timeout_ms"`
	IDPrefix  string `json:"id_prefix"`
	// loop
	Concurrency int `json:"concurrency"`
	SleepMs     int `json:"sleep_ms"`
	MaxSeconds  int `json:"max_seconds"`
	MaxCalls    int `json:"max_calls"`
}

type callResult struct {
	Name     string              `json:"name"`
	Method   string              `json:"method"`
	Code     int                 `json:"code"`
	Details  string              `json:"details"`
	Headers  map[string][]string `json:"headers"`
	Trailers map[string][]string `json:"trailers"`
	Sent     []messageInfo       `json:"sent"`
	Received []messageInfo       `json:"received"`
	Error    string              `json:"error,omitempty"`
}

func (r *callResult) setStatus(err error) {
	if err == nil || err == io.EOF {
		r.Code = 0
		return
	}
	st := status.Convert(err)
	r.Code = int(st.Code())
	r.Details = st.Message()
}

func (r *callResult) backend() string {
	if v := r.Headers["x-backend"]; len(v) > 0 {
		return v[0]
	}
	if v := r.Trailers["x-served-by"]; len(v) > 0 {
		return v[0]
	}
	return ""
}

func dial(target string, p *plan) (*grpc.ClientConn, error) {
	opts := []grpc.DialOption{
		grpc.WithInsecure(),
		grpc.WithDefaultCallOptions(
			grpc.ForceCodec(rawCodec{}),
			grpc.MaxCallRecvMsgSize(maxMessageBytes),
			grpc.MaxCallSendMsgSize(maxMessageBytes),
		),
	}
	if p.Channel.KeepaliveMs > 0 {
		keepaliveMinPingTime = time.Duration(p.Channel.KeepaliveMs) * time.Millisecond
		timeout := p.Channel.KeepaliveTimeoutMs
		if timeout <= 0 {
			timeout = 20000
		}
		opts = append(opts, grpc.WithKeepaliveParams(keepalive.ClientParameters{
			Time:                time.Duration(p.Channel.KeepaliveMs) * time.Millisecond,
			Timeout:             time.Duration(timeout) * time.Millisecond,
			PermitWithoutStream: true,
		}))
	}
	return grpc.Dial(target, opts...)
}

func outgoing(ctx context.Context, pairs [][2]string) context.Context {
	md := metadata.MD{}
	for _, kv := range pairs {
		key, value := kv[0], kv[1]
		if isBinKey(key) {
			raw, err := hex.DecodeString(value)
			if err == nil {
				value = string(raw)
			}
		}
		md.Append(key, value)
	}
	return metadata.NewOutgoingContext(ctx, md)
}

func runCall(conn *grpc.ClientConn, spec callSpec) callResult {
	res := callResult{Name: spec.Name, Method: spec.Method, Sent: []messageInfo{}, Received: []messageInfo{}}
	timeout := spec.TimeoutMs
	if timeout <= 0 {
		timeout = 10000
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(timeout)*time.Millisecond)
	defer cancel()
	ctx = outgoing(ctx, spec.Metadata)
	msgs := make([][]byte, len(spec.Messages))
	for i, m := range spec.Messages {
		msgs[i] = m.bytes()
		res.Sent = append(res.Sent, describe(msgs[i]))
	}
	halfClose := spec.HalfClose == nil || *spec.HalfClose
	cancelAfter := -1
	if spec.CancelAfter != nil {
		cancelAfter = *spec.CancelAfter
	}
	pause := func(i int) {
		if i > 0 && spec.IntervalMs > 0 {
			time.Sleep(time.Duration(spec.IntervalMs) * time.Millisecond)
		}
	}

	if spec.Method == methodUnary {
		var resp []byte
		var header, trailer metadata.MD
		req := []byte{}
		if len(msgs) > 0 {
			req = msgs[0]
		}
		err := conn.Invoke(ctx, spec.Method, &req, &resp, grpc.Header(&header), grpc.Trailer(&trailer))
		if err == nil {
			res.Received = append(res.Received, describe(resp))
		}
		res.setStatus(err)
		res.Headers, res.Trailers = mdJSON(header), mdJSON(trailer)
		return res
	}

	desc := &grpc.StreamDesc{
		ServerStreams: spec.Method != methodClientStream,
		ClientStreams: spec.Method != methodServerStream,
	}
	stream, err := conn.NewStream(ctx, desc, spec.Method)
	if err != nil {
		res.setStatus(err)
		res.Headers, res.Trailers = map[string][]string{}, map[string][]string{}
		return res
	}
	var final error
	done, cancelled := false, false
	recvOne := func() bool {
		var m []byte
		err := stream.RecvMsg(&m)
		if err != nil {
			final, done = err, true
			return false
		}
		res.Received = append(res.Received, describe(m))
		if cancelAfter >= 0 && len(res.Received) == cancelAfter {
			cancel()
			cancelled = true
		}
		return true
	}
	for i, m := range msgs {
		pause(i)
		m := m
		if err := stream.SendMsg(&m); err != nil {
			break // the stream ended: RecvMsg reports its status
		}
		if spec.Pingpong && !recvOne() {
			break
		}
	}
	if !done && !cancelled && cancelAfter >= 0 && len(res.Received) >= cancelAfter {
		cancel()
		cancelled = true
	}
	if !done && !cancelled && halfClose {
		_ = stream.CloseSend()
	}
	if !done {
		if spec.Method == methodClientStream {
			if recvOne() {
				final = nil
			}
		} else {
			for recvOne() {
			}
		}
	}
	res.setStatus(final)
	header, _ := stream.Header()
	res.Headers, res.Trailers = mdJSON(header), mdJSON(stream.Trailer())
	return res
}

func watchStates(conn *grpc.ClientConn, stop <-chan struct{}) func() []string {
	var mu sync.Mutex
	states := []string{}
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		<-stop
		cancel()
	}()
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		state := conn.GetState()
		for conn.WaitForStateChange(ctx, state) {
			state = conn.GetState()
			mu.Lock()
			states = append(states, strings.ToUpper(state.String()))
			mu.Unlock()
		}
	}()
	return func() []string {
		<-finished
		mu.Lock()
		defer mu.Unlock()
		return states
	}
}

func runCalls(conn *grpc.ClientConn, p *plan) map[string]interface{} {
	results := make([]callResult, 0, len(p.Calls))
	var states func() []string
	stop := make(chan struct{})
	if p.Parallel {
		out := make([]callResult, len(p.Calls))
		var wg sync.WaitGroup
		for i, spec := range p.Calls {
			wg.Add(1)
			go func(i int, spec callSpec) {
				defer wg.Done()
				out[i] = runCall(conn, spec)
			}(i, spec)
		}
		wg.Wait()
		results = out
	} else {
		for _, spec := range p.Calls {
			if spec.Method == "" {
				time.Sleep(time.Duration(spec.SleepMs) * time.Millisecond)
				continue
			}
			results = append(results, runCall(conn, spec))
			if p.WatchState && states == nil {
				states = watchStates(conn, stop) // from the first call on
			}
		}
	}
	out := map[string]interface{}{"calls": results}
	if states != nil {
		close(stop)
		out["states"] = states()
		out["final_state"] = strings.ToUpper(conn.GetState().String())
	}
	return out
}

// runStreams opens p.Streams bidi streams on the one connection; each sends a
// message and waits for its echo, and only once every stream has its echo
// (all open together) does each send a second one and half-close.
func runStreams(conn *grpc.ClientConn, p *plan) map[string]interface{} {
	n := p.Streams
	timeout := time.Duration(p.TimeoutMs) * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var phase1 sync.WaitGroup
	phase1.Add(n)
	allOpen := make(chan struct{})
	var firstEchoes int64
	type outcome struct {
		ok      bool
		backend string
		failure map[string]interface{}
	}
	outcomes := make([]outcome, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			arrived := false
			arrive := func() {
				if !arrived {
					arrived = true
					phase1.Done()
				}
			}
			defer arrive()
			fail := func(step string, err error) {
				st := status.Convert(err)
				outcomes[i].failure = map[string]interface{}{
					"index": i, "step": step, "code": int(st.Code()), "details": st.Message(),
				}
			}
			id := p.IDPrefix + "-" + itoa(i)
			sctx := outgoing(ctx, [][2]string{{"x-call-id", id}})
			stream, err := conn.NewStream(sctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, methodBidi)
			if err != nil {
				fail("open", err)
				return
			}
			for round := 0; round < 2; round++ {
				want := []byte(id + "-" + itoa(round))
				if err := stream.SendMsg(&want); err != nil {
					_, err = recvStatus(stream)
					fail("send", err)
					return
				}
				var got []byte
				if err := stream.RecvMsg(&got); err != nil {
					fail("recv", err)
					return
				}
				if string(got) != string(want) {
					outcomes[i].failure = map[string]interface{}{"index": i, "step": "echo", "got": string(got)}
					return
				}
				if round == 0 {
					atomic.AddInt64(&firstEchoes, 1)
					arrive()
					select {
					case <-allOpen:
					case <-ctx.Done():
						fail("barrier", ctx.Err())
						return
					}
				}
			}
			_ = stream.CloseSend()
			if _, err := recvStatus(stream); err != nil {
				fail("status", err)
				return
			}
			header, _ := stream.Header()
			outcomes[i].ok = true
			if v := header.Get("x-backend"); len(v) > 0 {
				outcomes[i].backend = v[0]
			}
		}(i)
	}
	phase1.Wait()
	close(allOpen)
	wg.Wait()
	ok := 0
	failures := []map[string]interface{}{}
	backends := map[string]int{}
	for _, o := range outcomes {
		if o.ok {
			ok++
			backends[o.backend]++
		} else if len(failures) < 10 && o.failure != nil {
			failures = append(failures, o.failure)
		}
	}
	return map[string]interface{}{
		"streams": n, "first_echoes": atomic.LoadInt64(&firstEchoes), "ok": ok,
		"failures": failures, "backends": backends,
	}
}

func recvStatus(stream grpc.ClientStream) (int, error) {
	extra := 0
	for {
		var m []byte
		err := stream.RecvMsg(&m)
		if err == io.EOF {
			return extra, nil
		}
		if err != nil {
			return extra, err
		}
		extra++
	}
}

func itoa(i int) string {
	const digits = "0123456789"
	if i == 0 {
		return "0"
	}
	var b []byte
	for ; i > 0; i /= 10 {
		b = append([]byte{digits[i%10]}, b...)
	}
	return string(b)
}

// runLoop makes calls (unary and client-streaming in turn) from
// p.Concurrency workers until stdin closes, p.MaxSeconds pass or p.MaxCalls
// were made.
func runLoop(conn *grpc.ClientConn, p *plan) map[string]interface{} {
	stop := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		close(stop)
	}()
	deadline := time.Now().Add(time.Duration(p.MaxSeconds) * time.Second)
	var next int64
	var mu sync.Mutex
	total, ok := 0, 0
	failures := []map[string]interface{}{}
	backends := map[string]int{}
	stopReason := "stdin closed"
	var wg sync.WaitGroup
	for w := 0; w < p.Concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if time.Now().After(deadline) {
					mu.Lock()
					stopReason = "max_seconds"
					mu.Unlock()
					return
				}
				k := int(atomic.AddInt64(&next, 1))
				if k > p.MaxCalls {
					mu.Lock()
					stopReason = "max_calls"
					mu.Unlock()
					return
				}
				spec := loopCall(p, k)
				res := runCall(conn, spec)
				mu.Lock()
				total++
				if res.Code == 0 {
					ok++
					backends[res.backend()]++
				} else if len(failures) < 10 {
					failures = append(failures, map[string]interface{}{
						"name": res.Name, "code": res.Code, "details": res.Details,
					})
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return map[string]interface{}{
		"total": total, "ok": ok, "failed": total - ok, "failures": failures,
		"backends": backends, "stop_reason": stopReason,
	}
}

func loopCall(p *plan, k int) callSpec {
	id := p.IDPrefix + "-" + itoa(k)
	md := [][2]string{{"x-call-id", id}, {"x-sleep-ms", itoa(p.SleepMs)}}
	text := id
	if k%2 == 0 {
		return callSpec{Name: id, Method: methodUnary, Metadata: md, Messages: []message{{Text: &text}}, TimeoutMs: 20000}
	}
	return callSpec{
		Name: id, Method: methodClientStream, Metadata: md,
		Messages: []message{{Text: &text}, {Text: &text}, {Text: &text}}, TimeoutMs: 20000,
	}
}

func runClient(target string, p *plan) (map[string]interface{}, error) {
	conn, err := dial(target, p)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	var out map[string]interface{}
	switch p.Mode {
	case "calls":
		out = runCalls(conn, p)
	case "streams":
		out = runStreams(conn, p)
	case "loop":
		out = runLoop(conn, p)
	default:
		out = map[string]interface{}{"fatal": "unknown mode " + p.Mode}
	}
	out["client"] = "go"
	out["mode"] = p.Mode
	return out, nil
}
