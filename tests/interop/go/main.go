// interop-peer: the grpc-go side of the agent-shim interop tests.
//
//	interop-peer serve --name NAME [--host 127.0.0.1] [--port 0] [--grace-ms 5000]
//	interop-peer client --target HOST:PORT --plan JSON
//
// `serve` runs the interop.Echo and interop.Control services (docs/interop.md)
// and prints a JSON line {"event": "listening", "port": P}; SIGTERM stops it
// gracefully (GOAWAY, running calls finish within the grace). `client` runs the
// plan against the target and prints one JSON result line.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: interop-peer serve|client ...")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "serve":
		flags := flag.NewFlagSet("serve", flag.ExitOnError)
		name := flags.String("name", "go", "backend name reported in x-backend")
		host := flags.String("host", "127.0.0.1", "address to bind")
		port := flags.Int("port", 0, "port (0: any free port)")
		grace := flags.Int("grace-ms", 5000, "graceful stop limit after SIGTERM")
		_ = flags.Parse(os.Args[2:])
		if err := serve(*name, *host, *port, time.Duration(*grace)*time.Millisecond); err != nil {
			fmt.Fprintln(os.Stderr, "serve:", err)
			os.Exit(1)
		}
	case "client":
		flags := flag.NewFlagSet("client", flag.ExitOnError)
		target := flags.String("target", "", "HOST:PORT to call")
		planText := flags.String("plan", "", "the plan, JSON")
		_ = flags.Parse(os.Args[2:])
		var p plan
		if err := json.Unmarshal([]byte(*planText), &p); err != nil {
			emit(map[string]string{"fatal": "bad plan: " + err.Error()})
			os.Exit(2)
		}
		out, err := runClient(*target, &p)
		if err != nil {
			emit(map[string]string{"fatal": err.Error()})
			os.Exit(1)
		}
		emit(out)
	default:
		fmt.Fprintln(os.Stderr, "usage: interop-peer serve|client ...")
		os.Exit(2)
	}
}
