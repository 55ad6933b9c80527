"""A gRPC server whose health service is grpcio's own (grpcio-health-checking's HealthServicer):
`python grpc_health_backend.py PORT --status-file FILE [--tls CERT KEY]`.

The whole server ("") is SERVING; the service `svc.A` has the status the file names (SERVING or
NOT_SERVING), read at each Check; any other service is unknown (NOT_FOUND). Prints `ready` once serving.
"""
import argparse
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from grpc_backend import serve

SERVICE = "svc.A"


class FileHealth(health.HealthServicer):
    """grpcio's servicer, its `svc.A` status set from the file before each answer."""

    def __init__(self, status_file: str) -> None:
        super().__init__()
        self.status_file = status_file

    def Check(self, request, context):  # noqa: N802 (grpcio's name)
        with open(self.status_file) as f:
            status = f.read().strip()
        self.set(SERVICE, health_pb2.HealthCheckResponse.ServingStatus.Value(status))
        return super().Check(request, context)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--status-file", required=True)
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(FileHealth(args.status_file), server)
    serve(server, args.port, args.tls)

if __name__ == "__main__":
    main()
