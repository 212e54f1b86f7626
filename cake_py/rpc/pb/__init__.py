"""Generated protobuf/gRPC code for proto/cake/v1/worker.proto; regenerate with `python scripts/gen_proto.py`.

Only cake_py.rpc imports this package: `from cake_py.rpc.pb import worker_pb2 as pb, worker_pb2_grpc as pb_grpc`.
"""
