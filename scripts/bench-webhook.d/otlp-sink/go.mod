// Module of the OTLP trace receiver that scripts/bench-webhook builds. go.sum pins every
// dependency by hash. The versions are those that kube-apiserver v1.37.2 links
// (scripts/k8s-testenv.d/kube/go.mod).
module llmroute.test/bench-webhook/otlp-sink

go 1.26.0

require (
	go.opentelemetry.io/proto/otlp v1.10.0
	google.golang.org/grpc v1.82.1
)

require (
	github.com/grpc-ecosystem/grpc-gateway/v2 v2.28.0 // indirect
	golang.org/x/net v0.53.0 // indirect
	golang.org/x/sys v0.43.0 // indirect
	golang.org/x/text v0.36.0 // indirect
	google.golang.org/genproto/googleapis/api v0.0.0-20260414002931-afd174a4e478 // indirect
	google.golang.org/genproto/googleapis/rpc v0.0.0-20260414002931-afd174a4e478 // indirect
	google.golang.org/protobuf v1.36.11 // indirect
)
