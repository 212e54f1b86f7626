"""Settings dataclasses and cluster.yaml parsing. The only module that reads environment variables."""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cake_py.cluster.names import WorkerNames
from cake_py.cluster.placement import check_manual
from cake_py.errors import ClusterError, ConfigError

DTYPES = ("bfloat16", "float16", "float32")
DEVICES = ("auto", "cpu", "cuda", "mps")
DEFAULT_WORKER_PORT = 10128
DEFAULT_SERVE_PORT = 8080


@dataclass(frozen=True)
class WorkerSpec:
    """A worker as the master knows it: a name, an address, and optionally the half-open layer range it must hold."""

    name: str
    address: str
    layers: tuple[int, int] | None = None
    named: bool = True  # False for --workers entries: the worker's own --name is shown instead


POOLING_KINDS = ("last", "mean")  # how /v1/embeddings pools a prompt (models/pooling.py)


@dataclass
class ServeSettings:
    model: str | None = None
    config_path: Path | None = None
    workers: list[WorkerSpec] = field(default_factory=list)
    # Shared by every copy (`replace`) of these settings: the names this server shows its workers under.
    worker_names: WorkerNames = field(default_factory=WorkerNames, compare=False, repr=False)
    host: str = "127.0.0.1"
    port: int = DEFAULT_SERVE_PORT
    model_name: str | None = None
    dtype: str = "bfloat16"
    device: str = "auto"
    # Bearer keys the API takes (--api-key, --api-key-file): none leaves it open; with several, each key's stored
    # objects (files, batches, stored completions and responses) are its own, and each has its own rate limit.
    api_keys: tuple[str, ...] = ()
    api_key_names: dict[str, str] = field(default_factory=dict)  # key → the name --api-key-file gives it
    # --admin-key: the one key /models/load and /models/unload take (with several API keys, none takes them without
    # it: one tenant would switch the model for every other); also an API key when the API has keys.
    admin_key: str | None = None
    ui_auth: tuple[str, str] | None = None
    # CORS: origins whose pages may call the API; () = none; None = any (*) when --api-key guards it, else none
    allowed_origins: tuple[str, ...] | None = None
    cluster_key: str | None = None
    log_level: str = "info"
    threads: int | None = None
    rate_limit: int = 60  # requests per minute per client on generation routes; 0 turns it off
    rate_burst: int = 10
    max_body_bytes: int = 8 * 1024 * 1024
    max_running: int = 16  # sequences decoded together in one step
    max_queued: int = 1024  # sequences waiting to start; past it a request gets 503 and Retry-After
    max_batch_tokens: int = 512  # tokens per step: what a long prompt's prefill adds to every running stream's step
    prefix_cache_tokens: int = 8192  # finished sequences' caches kept for prompts that start the same way; 0: off
    speculative_tokens: int = 0  # prompt lookup decoding: draft tokens per decode step; 0: off
    pooling: str | None = None  # /v1/embeddings: last or mean; None: the model folder's, else last
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    connect_timeout: float = 10.0  # seconds to wait for each worker at startup (it may still be starting)
    cpus: tuple[int, ...] | None = None  # CPUs this process may run on (--cpus); None = wherever the OS likes
    chain: bool = True  # workers pass hidden states straight to the next worker (--no-chain: via the master)
    # A chained step of at least twice this many tokens runs as pieces in flight at once (cluster/micro_batches.py);
    # None: 128 where the workers compute apart (other hosts or GPUs), else off (cluster/master.py)
    micro_batch_tokens: int | None = None
    cuda_graphs: bool = True  # on a GPU, one sequence's decode steps replay as CUDA graphs (--no-cuda-graphs)
    keep_free_bytes: int | None = None  # host memory KV caches never take (--keep-free-mb); None: kv_pool's default
    # The Files and Batch APIs: where files and batches are kept, the largest upload, and how many of a batch's
    # requests run at once (None: half of max_running, so interactive requests keep slots of their own).
    files_dir: Path = field(default_factory=lambda: default_files_dir())
    max_file_bytes: int = 512 * 1024 * 1024
    files_max_bytes: int = 0  # --files-max-gb: what the Files API keeps per API key, uploads refused past it (0: none)
    batch_concurrency: int | None = None
    # A worker down this many seconds has its layers placed on the nodes still up (0: off; api/failover.py).
    failover_after: float = 0.0
    # --chat-template: a Jinja chat template replacing the startup model's own (a model loaded later keeps its own)
    chat_template: str | None = None
    # --trust-request-chat-template: a chat request's own `chat_template` (vLLM's field) renders it; else a 400
    trust_request_chat_template: bool = False
    # --max-model-len: the most tokens a sequence may hold (prompt and answer), at most the model's context
    max_model_len: int | None = None


@dataclass
class WorkerSettings:
    kv_idle_seconds: float = 600.0  # KV caches of a sequence no master touched for this long are freed
    assign_idle_seconds: float = 60.0  # an Assign stream that sends nothing this long is given up (a frozen master)
    data_port: int = 0  # forward fast path: 0 = a free port (announced in the handshake), -1 = off
    host: str = "0.0.0.0"
    port: int = DEFAULT_WORKER_PORT
    name: str | None = None
    cluster_key: str | None = None
    cache_dir: Path = field(default_factory=lambda: default_cache_dir())
    cache_max_bytes: int = 0  # the weight cache's size limit (least recently used weights go first); 0: none
    device: str = "auto"
    threads: int | None = None
    log_level: str = "info"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    cpus: tuple[int, ...] | None = None
    cuda_graphs: bool = True
    keep_free_bytes: int | None = None  # as ServeSettings'


def env(name: str) -> str | None:
    """An environment variable, empty treated as unset."""
    value = os.environ.get(name)
    return value if value else None


def env_given(name: str) -> str | None:
    """An environment variable as set, empty included (a secret's variable set from an unset one must not mean
    "no secret")."""
    return os.environ.get(name)


MAX_SETTINGS_FILE_BYTES = 1 << 20  # a chat template or cluster.yaml: kilobytes; past this it is the wrong file


def read_settings_file(path: Path, flag: str) -> bytes:
    """A small regular file a flag names; ConfigError for anything else (/dev/zero was read until memory ran out)."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{flag} {str(path)!r} is not a regular file")
        if info.st_size > MAX_SETTINGS_FILE_BYTES:
            raise ConfigError(
                f"{flag} {str(path)!r} is {info.st_size} bytes, more than {MAX_SETTINGS_FILE_BYTES} for a settings file"
            )
        return path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{flag}: cannot read {str(path)!r}: {error.strerror or error}") from None


def _base_dir(variable: str, *under_home: str) -> Path:
    """An XDG base folder: the variable, else its place under the home folder. A relative value is ignored, as the
    XDG spec says: it named a different folder from every working directory (weights cached again, files lost)."""
    value = env(variable)
    if value and os.path.isabs(value):
        return Path(value)
    try:
        home = Path.home()
    except RuntimeError:  # no HOME and no passwd entry (a container run as a uid it does not know)
        raise ConfigError(f"there is no home folder to keep files in: set HOME or {variable}") from None
    return home.joinpath(*under_home)


def default_cache_dir() -> Path:
    return _base_dir("XDG_CACHE_HOME", ".cache") / "cake" / "worker"


def default_files_dir() -> Path:
    return _base_dir("XDG_DATA_HOME", ".local", "share") / "cake" / "files"


def check_dtype(value: str) -> str:
    if value not in DTYPES:
        raise ConfigError(f"unknown dtype {value!r} (choose one of {', '.join(DTYPES)})")
    return value


def check_device(value: str) -> str:
    """auto, cpu, cuda, mps, or cuda:N for one GPU of several (whether it exists is checked when it is used)."""
    index = value.removeprefix("cuda:")
    if value not in DEVICES and not (index != value and index.isdigit()):
        raise ConfigError(f"unknown device {value!r} (choose one of {', '.join(DEVICES)}, or cuda:N)")
    return value


def parse_address(value: str) -> str:
    if "://" in value:
        raise ConfigError(f"worker address {value!r} is not HOST:PORT: give it without a scheme, like 10.0.0.5:10128")
    try:  # bytes a non-UTF-8 terminal passed (surrogate escapes): gRPC raised on them, a traceback
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"worker address {value!r} is not valid UTF-8 (the terminal's encoding?)") from None
    host, sep, port = value.rpartition(":")
    # ASCII digits only: str.isdigit() and int() also take other scripts' digits ("١٢"), which gRPC does not
    if (
        not sep
        or not host
        or not re.fullmatch(r"[0-9]+", port)
        or not 0 < int(port) < 65536
        or any(c.isspace() for c in value)
    ):
        raise ConfigError(f"worker address {value!r} is not HOST:PORT")
    if host.startswith("["):
        if not host.endswith("]") or ":" not in host[1:-1] or "[" in host[1:] or "]" in host[:-1]:
            raise ConfigError(f"worker address {value!r}: brackets hold an IPv6 address, like [::1]:{port}")
    elif ":" in host:
        if _is_ipv6(host):
            raise ConfigError(f"worker address {value!r}: write an IPv6 address in brackets, like [{host}]:{port}")
        # Not an IPv6 address with a port (127.0.0.1:18610:5): brackets around it would be no better.
        raise ConfigError(f"worker address {value!r} is not HOST:PORT (one ':', or an IPv6 address in brackets)")
    return value


def _is_ipv6(host: str) -> bool:
    """An IPv6 address as written without brackets (fe80::1%eth0 with its zone too)."""
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _inclusive_range(text: str, what: str, example: str) -> tuple[int, int]:
    """'3-7' or '3' → (3, 7) or (3, 3); ConfigError naming `what` otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", text)
    if not match:
        raise ConfigError(f"{what} is not a number or a range like {example!r}")
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    if last < first:
        raise ConfigError(f"{what} ends before it starts")
    return first, last


def parse_layers(value: Any, where: str) -> tuple[int, int]:
    """'0-14' (inclusive, like Cake's model.layers.0-14) or '7' → half-open (start, end)."""
    text = str(value).strip().removeprefix("model.layers.")
    first, last = _inclusive_range(text, f"{where}: layers {value!r}", "0-14")
    return first, last + 1


MAX_CPU_NUMBER = 8192  # Linux's CONFIG_NR_CPUS ceiling: a larger number is a typo, not a machine


def parse_cpus(value: str | None) -> tuple[int, ...] | None:
    """'0-3,6' (taskset's list form) → (0, 1, 2, 3, 6); None stays None. Checks the form, not the machine."""
    if value is None:
        return None
    cpus: set[int] = set()
    for item in value.split(","):
        first, last = _inclusive_range(item, f"--cpus {value!r}: {item.strip()!r}", "0-3")
        if last >= MAX_CPU_NUMBER:
            raise ConfigError(f"--cpus {value!r}: CPU {last} is past the largest CPU number Linux allows")
        cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))


def parse_workers_flag(value: str) -> list[WorkerSpec]:
    addresses = [item.strip() for item in value.split(",")]
    if not any(addresses):
        raise ConfigError(f"--workers {value!r} lists no HOST:PORT")
    if "" in addresses:  # `a,,b` or `a,` from a list built in a script: an address left out, maybe a worker
        raise ConfigError(f"--workers {value!r}: entry {addresses.index('') + 1} is empty (a comma too many?)")
    return [WorkerSpec(f"worker-{i + 1}", parse_address(address), named=False) for i, address in enumerate(addresses)]


def _worker_name(value: Any, index: int, path: Path) -> str:
    """A worker's `name`: worker-N when left out; a number is its text. `name: ""`, `name: 0` became worker-N and
    `name: [a]` "['a']", without a word."""
    if value is None:
        return f"worker-{index + 1}"
    if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
        raise ConfigError(f"cluster config {str(path)!r}: worker #{index + 1}'s name must be a word, got {value!r}")
    if any(ord(char) < 32 or ord(char) == 127 for char in str(value)):  # a line break forges log lines, as --name's
        raise ConfigError(
            f"cluster config {str(path)!r}: worker #{index + 1}'s name {value!r} holds a control character"
        )
    return str(value)


@dataclass(frozen=True)
class ClusterFile:
    model: str | None
    workers: list[WorkerSpec]


def _unique_keys_loader() -> type:
    """PyYAML's safe loader, refusing a key given twice in one mapping: it keeps the last silently, so a second
    `workers:` (a pasted block) dropped the first list and the master served without those workers."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden, as YAML says
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: PyYAML's own error names it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"found key {key!r} twice", key_node.start_mark
                    )
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def load_cluster_file(path: Path) -> ClusterFile:
    """Parse cluster.yaml: `model` (optional) and `workers: [{name, address, layers?}]`."""
    import yaml

    try:
        # bytes: PyYAML reads UTF-8/16 and BOMs itself
        data = yaml.load(read_settings_file(path, "--config"), Loader=_unique_keys_loader())  # noqa: S506 - safe
    except yaml.YAMLError as error:
        where = " ".join(str(error).split())  # PyYAML's message spans lines; an error here is one line
        raise ConfigError(f"cluster config {str(path)!r} is not valid YAML: {where}") from error
    except RecursionError:
        raise ConfigError(f"cluster config {str(path)!r} is nested too deeply to be a cluster config") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"cluster config {str(path)!r} must be a mapping with 'workers'")
    unknown = set(data) - {"model", "workers"}
    if unknown:
        raise ConfigError(f"cluster config {str(path)!r}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    # Only a missing or null `workers` means none: `workers: {}`, `''` or `0` served without workers, silently.
    raw_workers = data.get("workers")
    if raw_workers is None:
        raw_workers = []
    if not isinstance(raw_workers, list):
        raise ConfigError(f"cluster config {str(path)!r}: 'workers' must be a list, got {raw_workers!r}")
    workers: list[WorkerSpec] = []
    for index, item in enumerate(raw_workers):
        if not isinstance(item, dict) or "address" not in item:
            raise ConfigError(f"cluster config {str(path)!r}: worker #{index + 1} needs an 'address'")
        name = _worker_name(item.get("name"), index, path)
        if name == "master":  # the master's own stages carry that name (topology, /health, /metrics)
            raise ConfigError(f"cluster config {str(path)!r}: worker {index + 1} may not be named 'master'")
        extra = set(item) - {"name", "address", "layers"}
        if extra:
            raise ConfigError(f"worker {name!r}: unknown key(s) {', '.join(sorted(map(str, extra)))}")
        layers = parse_layers(item["layers"], f"worker {name!r}") if item.get("layers") is not None else None
        if not isinstance(item["address"], str):
            raise ConfigError(f"worker {name!r}: address must be HOST:PORT, got {item['address']!r}")
        workers.append(WorkerSpec(name, parse_address(item["address"]), layers))
    names = [w.name for w in workers]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ConfigError(f"cluster config {str(path)!r}: duplicate worker name(s) {', '.join(sorted(duplicates))}")
    # What needs no model is said now, not once the model is loaded (after a download, maybe): layers for some
    # workers only, overlapping ranges. Whether they fit the model is checked when its layer count is known.
    try:
        check_manual({worker.name: worker.layers for worker in workers}, n_layers=None)
    except ClusterError as error:
        raise ConfigError(str(error)) from None
    model = data.get("model")
    # str() turned `model: [a, b]` or `model: true` into a name to look up, and `model: ""` served the embedded default
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise ConfigError(f"cluster config {str(path)!r}: 'model' must be a Hub id or a path in quotes, got {model!r}")
    return ClusterFile(model and _beside(path, model), workers)


def _beside(config: Path, model: str) -> str:
    """cluster.yaml's `model` as a path relative to the file's folder (as docker-compose and kustomize read paths in
    their files), when one exists there; anything else as written: an absolute or `~` path, a Hub id (`org/name`
    reads as a relative path too), or a path found from the working directory only, as before."""
    if os.path.isabs(model) or model.startswith("~"):
        return model
    # The folder's real path: what the master shows (/models/current's load_as) loads again from any directory.
    try:
        beside = config.parent.resolve() / model
        exists = beside.exists()
    except (OSError, ValueError, RuntimeError):  # a name too long for the OS, a NUL, a symlink loop: left as given
        return model
    return str(beside) if exists else model
