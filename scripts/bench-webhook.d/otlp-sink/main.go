// Command otlp-sink receives OpenTelemetry traces over OTLP/gRPC on 127.0.0.1 and writes one
// line per span whose name matches -span to -out. scripts/bench-webhook runs it so that
// kube-apiserver's own span of each webhook call ("Call mutating webhook", started in
// callAttrMutatingHook of k8s.io/apiserver) gives the exact duration of every call, where the
// API server's histogram only has buckets of 5, 25 and 100 ms.
//
// Each line is tab-separated:
//
//	start_unix_nano  end_unix_nano  request_completed_unix_nano  webhook  operation
//
// request_completed_unix_nano is the time of the span's "Request completed" event (the
// webhook's response decoded, before the patch is applied), or 0 when the span has none.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"

	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonv1 "go.opentelemetry.io/proto/otlp/common/v1"
	"google.golang.org/grpc"
)

type sink struct {
	collectortrace.UnimplementedTraceServiceServer
	spanName string
	mu       sync.Mutex
	out      *bufio.Writer
	file     *os.File
	received uint64
	written  uint64
}

func attribute(attrs []*commonv1.KeyValue, key string) string {
	for _, kv := range attrs {
		if kv.GetKey() == key {
			return kv.GetValue().GetStringValue()
		}
	}
	return ""
}

// Export writes the matching spans of one batch and flushes the file, so that a reader sees
// every span of a batch as soon as the API server's exporter has sent it.
func (s *sink) Export(_ context.Context, req *collectortrace.ExportTraceServiceRequest) (*collectortrace.ExportTraceServiceResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, resource := range req.GetResourceSpans() {
		for _, scope := range resource.GetScopeSpans() {
			for _, span := range scope.GetSpans() {
				s.received++
				if span.GetName() != s.spanName {
					continue
				}
				var completed uint64
				for _, event := range span.GetEvents() {
					if event.GetName() == "Request completed" {
						completed = event.GetTimeUnixNano()
					}
				}
				fmt.Fprintf(s.out, "%d\t%d\t%d\t%s\t%s\n",
					span.GetStartTimeUnixNano(), span.GetEndTimeUnixNano(), completed,
					attribute(span.GetAttributes(), "webhook"),
					attribute(span.GetAttributes(), "operation"))
				s.written++
			}
		}
	}
	if err := s.out.Flush(); err != nil {
		log.Printf("otlp-sink: error writing %s: %v", s.file.Name(), err)
		return nil, err
	}
	return &collectortrace.ExportTraceServiceResponse{}, nil
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on; must be on 127.0.0.1")
	outPath := flag.String("out", "", "file to write the matching spans to (required)")
	addrPath := flag.String("address-file", "", "file to write the bound address to, once listening")
	spanName := flag.String("span", "Call mutating webhook", "name of the spans to keep")
	flag.Parse()
	if *outPath == "" {
		log.Fatal("otlp-sink: missing -out FILE: give the file to write the spans to")
	}
	host, _, err := net.SplitHostPort(*listen)
	if err != nil || host != "127.0.0.1" {
		log.Fatalf("otlp-sink: -listen %q must be 127.0.0.1:PORT", *listen)
	}
	file, err := os.Create(*outPath)
	if err != nil {
		log.Fatalf("otlp-sink: failed to create -out %s: %v; check that its folder exists", *outPath, err)
	}
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("otlp-sink: failed to listen on %s: %v; give a free port or 127.0.0.1:0", *listen, err)
	}
	address := listener.Addr().String()
	if *addrPath != "" {
		if err := os.WriteFile(*addrPath, []byte(address+"\n"), 0o644); err != nil {
			log.Fatalf("otlp-sink: failed to write -address-file %s: %v", *addrPath, err)
		}
	}
	s := &sink{spanName: *spanName, out: bufio.NewWriter(file), file: file}
	server := grpc.NewServer()
	collectortrace.RegisterTraceServiceServer(server, s)
	log.Printf("otlp-sink: listening on %s, writing spans named %q to %s", address, *spanName, *outPath)

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		sig := <-signals
		log.Printf("otlp-sink: %v received, stopping", sig)
		server.GracefulStop()
	}()
	if err := server.Serve(listener); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		log.Fatalf("otlp-sink: failed to serve on %s: %v", address, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.out.Flush(); err != nil {
		log.Printf("otlp-sink: error writing %s: %v", *outPath, err)
	}
	if err := file.Close(); err != nil {
		log.Printf("otlp-sink: error closing %s: %v", *outPath, err)
	}
	log.Printf("otlp-sink: stopped; %d spans received, %d written", s.received, s.written)
}
