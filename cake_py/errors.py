"""One exception family for cake_py; every message names the bad value so users can act on it."""

from __future__ import annotations

import signal


class CakeError(Exception):
    """Base of every error cake_py raises on purpose. `str(error)` is a complete one-line message."""


class ConfigError(CakeError):
    """A setting, flag or cluster.yaml value is invalid."""


class ModelError(CakeError):
    """A model cannot be found, read or understood."""


class ModelNotFoundError(ModelError):
    """The model path or Hub id does not exist (or is not cached while offline)."""


class HubError(ModelError):
    """The Hugging Face Hub (or its file server) failed or stopped answering during a download: not the model's
    fault nor this server's, and worth trying again."""


class UnsupportedArchitectureError(ModelError):
    """config.json names an architecture cake_py does not implement."""


class WeightsError(ModelError):
    """A weights file is truncated, corrupt or lacks a tensor the model needs."""


class RequestError(CakeError):
    """A generation request is invalid (bad sampling value, prompt too long, ...)."""


class ContextLengthError(RequestError):
    """The prompt does not fit in the model's context window."""


class OverloadedError(CakeError):
    """Too many requests are waiting: refused now rather than queued for minutes."""


class KVMemoryError(CakeError):
    """A sequence's KV caches would grow into the memory kept free for everything else: that sequence ends with this
    error instead of the process being killed for memory. Its message starts with `MARK`, which survives the wire
    (a worker's error reaches the master as text)."""

    MARK = "not enough memory for the KV caches"


class ClusterError(CakeError):
    """A worker is unreachable, refuses us, or the topology is invalid."""


class WorkerSilentError(ClusterError):
    """A worker's connection is open but it answered nothing in time: paused, overloaded, or the network stalls (a
    worker that died closes its connection, which is a plain ClusterError)."""


class StageError(ClusterError):
    """A pipeline stage failed while serving a forward pass."""


class Stopped(Exception):  # noqa: N818 - not an error: how a server's run ends
    """`cake serve` or `cake worker` stopped cleanly on SIGINT or SIGTERM, its work ended and its ports closed. Not a
    CakeError: the CLI says it stopped, in one line, and exits 130 for SIGINT or 0 for SIGTERM (cli.py)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StoppedStarting(BaseException):  # noqa: N818 - not an error: how a startup ends on SIGTERM
    """SIGTERM while `cake serve` or `cake worker` starts (a download, a handshake, a weight stream), raised where the
    main thread is, as KeyboardInterrupt is for SIGINT. A BaseException like it, so that no `except Exception` of
    the startup takes it for a failure; the CLI says it stopped and exits as a stop while serving does."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
