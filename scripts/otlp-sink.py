#!/usr/bin/env python3
"""A local OTLP/gRPC trace receiver for benchmarks: accepts every export, counts the spans,
prints its port on stdout and, when stopped (SIGTERM), the span count on stderr.

Needs grpcio and opentelemetry-proto (scripts/bench-observability.sh installs them)."""
import signal
import sys
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    spans = 0

    def Export(self, request, context):
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                Sink.spans += len(ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)


def stop(*_):
    print(f"otlp-sink: received {Sink.spans} spans", file=sys.stderr, flush=True)
    server.stop(0)
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
server.wait_for_termination()
