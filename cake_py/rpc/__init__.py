"""The master-worker wire: generated protobuf code (`pb`), the tensor codec, the worker servicer and its client.

Nothing outside this package imports `cake_py.rpc.pb`; the rest of cake_py speaks torch tensors and dataclasses.
"""

from __future__ import annotations

import os

# gRPC's C core logs every failed connection or TLS handshake attempt to stderr (several lines a second while it
# retries); our own errors already say what went wrong, once. Set before any module of this package imports grpc.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

# Version of the wire contract in proto/cake/v1/worker.proto. Bump it on any change a peer built from the old
# .proto would misread; Handshake refuses a peer whose version differs.
PROTOCOL_VERSION = 5

# Bytes of weight data per Assign TensorChunk: large enough to amortise per-message cost, small enough to keep
# both ends' memory flat while streaming a multi-GB layer range.
WEIGHT_CHUNK_BYTES = 1024 * 1024

# gRPC's default 4 MiB message cap is too small for a long prefill's hidden states
# (tokens x hidden_size x 2 bytes); both ends raise it to this.
MAX_MESSAGE_BYTES = 1024 * 1024 * 1024
