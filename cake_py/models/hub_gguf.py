"""Hub repos of GGUF files, as llama.cpp's `-hf REPO[:TAG]` takes them.

`org/name-GGUF:Q4_K_M` picks the repo's GGUF whose file name holds the tag (any case), every part of it when it is
split; a bare `org/name-GGUF` (a repo with GGUF files and no safetensors checkpoint) picks llama.cpp's "latest":
Q4_K_M, else a Q4 one, else the first GGUF. Only the chosen files are downloaded, into the standard HF cache;
offline, the choice is made among the files of the cached snapshot. The model id is the MODEL as given (llama.cpp's
`-hf` shows the same), so /v1/models lists `org/name-GGUF:Q4_K_M`.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from cake_py.errors import ModelNotFoundError
from cake_py.models import hub

# llama.cpp's default tag ("latest"): Q4_K_M first, then any Q4, then the first GGUF of the repo.
DEFAULT_TAGS = ("Q4_K_M", "Q4")
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_QUANT = re.compile(r"(?<![A-Za-z0-9])(I?Q\d(?:_[A-Za-z0-9]+)*|BF16|F16|F32)(?![A-Za-z0-9])", re.IGNORECASE)


def split_tag(spec: str) -> tuple[str, str | None]:
    """`org/name:TAG` as (repo id, tag); a spec without ':' has no tag. Repo ids never hold ':'."""
    repo_id, colon, tag = spec.partition(":")
    if colon and (not repo_id or not tag or ":" in tag or "/" in tag):
        raise ModelNotFoundError(f"{spec!r} is not of the form 'org/name' or 'org/name:QUANT' (e.g. ':Q4_K_M')")
    return repo_id, tag or None


def _ggufs(files: list[str]) -> list[str]:
    """The model GGUFs among a repo's files: multimodal projectors (mmproj-*.gguf) are not models."""
    return sorted(
        name for name in files if name.lower().endswith(".gguf") and "mmproj" not in PurePosixPath(name).name.lower()
    )


def quantizations(files: list[str]) -> list[str]:
    """The quantization tags a repo's GGUF file names show (Q4_K_M, IQ2_XS, F16, …), else their names."""
    found: dict[str, None] = {}
    for name in _ggufs(files):
        base = _SPLIT.sub(".gguf", PurePosixPath(name).name)
        match = _QUANT.search(base[: -len(".gguf")])
        found[match.group(1).upper() if match else base] = None
    return list(found)


def choose(repo_id: str, files: list[str], tag: str | None) -> list[str]:
    """The files of `repo_id` to download for `tag` as llama.cpp chooses them, the first part first."""
    ggufs = _ggufs(files)
    if not ggufs:
        raise ModelNotFoundError(
            f"Hub repo {repo_id!r} has no GGUF file: the tag {tag!r} picks a GGUF quantization; "
            f"pass {repo_id!r} alone to serve its safetensors checkpoint"
        )

    def matching(wanted: str) -> list[str]:
        return [name for name in ggufs if wanted.lower() in PurePosixPath(name).name.lower()]

    if tag is not None:
        chosen = matching(tag)
        if not chosen:
            raise ModelNotFoundError(
                f"Hub repo {repo_id!r} has no GGUF matching {tag!r}; its quantizations: "
                f"{', '.join(quantizations(files))}"
            )
    else:
        chosen = next((found for wanted in DEFAULT_TAGS if (found := matching(wanted))), ggufs)
    first = chosen[0]
    split = _SPLIT.search(first)
    if split is None:
        return [first]
    prefix, count = first[: split.start()], split.group(2)
    parts = [
        name for name in ggufs if (s := _SPLIT.search(name)) and name[: s.start()] == prefix and s.group(2) == count
    ]
    return sorted(parts)


def complete(chosen: list[str]) -> bool:
    """Whether `choose`'s files are the whole GGUF: every part of a split one (a cache may hold some of them)."""
    split = _SPLIT.search(chosen[0])
    return split is None or len(chosen) == int(split.group(2))


def _cached_files(repo_id: str) -> list[str] | None:
    """The files of `repo_id`'s cached snapshot (its `main`, else its newest), or None when none is cached."""
    folder = hub.repo_folder(repo_id)
    ref = folder / "refs" / "main"
    snapshots = folder / "snapshots"
    snapshot = snapshots / ref.read_text().strip() if ref.is_file() else None
    if snapshot is None or not snapshot.is_dir():
        found = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
        if not found:
            return None
        snapshot = found[-1]
    return [str(p.relative_to(snapshot).as_posix()) for p in snapshot.rglob("*") if p.is_file()]


def repo_files(repo_id: str) -> tuple[list[str] | None, Exception | None]:
    """`repo_id`'s file list from the Hub, else (offline, or the Hub unreachable) from the HF cache, None when it is
    neither listed nor cached; and why the Hub did not answer (None: it did). An error answer of the Hub (no such
    repo, gated, 5xx) is raised as `download` raises it."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    unreachable: tuple[type[Exception], ...] = (OfflineModeIsEnabled, LocalEntryNotFoundError, *hub.transport_errors())
    try:
        # model_info, not list_repo_files: that one retries a silent Hub for a minute; this fails in one timeout
        return [sibling.rfilename for sibling in HfApi().model_info(repo_id).siblings or []], None
    except unreachable as error:
        return _cached_files(repo_id), error
    except Exception as error:
        refused = hub.answer_error(repo_id, error)
        if refused is None:
            raise
        raise refused from error


def is_gguf_repo(files: list[str]) -> bool:
    """A repo served as GGUF without a tag: GGUF files and no config.json with safetensors weights."""
    checkpoint = "config.json" in files and any(
        name in files for name in ("model.safetensors", "model.safetensors.index.json")
    )
    return bool(_ggufs(files)) and not checkpoint


def download_gguf(repo_id: str, files: list[str], tag: str | None, online: bool) -> Path:
    """The chosen GGUF's first part in the HF cache, every chosen file downloaded if needed."""
    from huggingface_hub import snapshot_download

    chosen = choose(repo_id, files, tag)
    try:
        snapshot = Path(
            hub.interruptible(
                repo_id, lambda: snapshot_download(repo_id, allow_patterns=[*chosen], local_files_only=not online)
            )
        )
    except Exception as error:
        failed = hub.download_error(repo_id, error)
        if failed is None:
            raise
        raise failed from error
    missing = [name for name in chosen if not (snapshot / name).is_file()]
    if missing:  # offline, with a cached snapshot that lacks them
        raise ModelNotFoundError(
            f"{', '.join(missing)} of {repo_id!r} is not in the HF cache and the Hub cannot be reached"
        )
    return snapshot / chosen[0]


def hub_model(spec: str) -> tuple[str, Path]:
    """A Hub MODEL (`org/name`, `org/name:TAG`) as (model id, path to load): a GGUF's first part, or a safetensors
    repo's snapshot folder (`hub.download`)."""
    repo_id, tag = split_tag(spec)
    hub.check_repo_id(repo_id)
    hub.bound_hub_timeouts()
    files, unreachable = repo_files(repo_id)
    if files is None:  # the Hub did not answer (offline) and nothing of the repo is cached
        reason = hub.one_line(unreachable) if unreachable else "no answer"
        raise ModelNotFoundError(
            f"model {repo_id!r} is not in the HF cache and the Hub cannot be reached (offline: {reason[:300]})"
        )
    online = unreachable is None
    if tag is None and not is_gguf_repo(files):
        return spec, hub.download(repo_id, local_files_only=not online)
    return spec, download_gguf(repo_id, files, tag, online)
