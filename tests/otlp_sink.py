#!/usr/bin/env python3
"""An OTLP/gRPC sink built from the official OpenTelemetry protobuf definitions: writes
every export request it receives as one OTLP/JSON line to --out. The tests put it behind
a real collector (rotel) to see exactly what a backend would receive."""
import argparse
import threading
from concurrent import futures

import grpc
from google.protobuf.json_format import MessageToJson
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Sink(metrics_service_pb2_grpc.MetricsServiceServicer, trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, path):
        self.out = open(path, "a")
        self.lock = threading.Lock()

    def _write(self, request):
        line = MessageToJson(request, indent=None)
        with self.lock:
            self.out.write(line + "\n")
            self.out.flush()

    def Export(self, request, context):  # noqa: N802 (gRPC method name)
        self._write(request)
        if isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
            return metrics_service_pb2.ExportMetricsServiceResponse()
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tls-cert", help="serve TLS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="and this key (PEM)")
    args = parser.parse_args()
    # The sink accepts what the collector forwards, however large; the limits under
    # test are the collector's own.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    sink = Sink(args.out)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(sink, server)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    if args.tls_cert:
        with open(args.tls_key, "rb") as key, open(args.tls_cert, "rb") as cert:
            credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
        server.add_secure_port(f"127.0.0.1:{args.port}", credentials)
    else:
        server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print("listening", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
