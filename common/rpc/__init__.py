"""Generated gRPC stubs for offsite.v1 (committed; `codegen --check` guards against staleness)."""

from . import offsite_pb2 as pb
from . import offsite_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
