"""The HF cache as `cake list`, `cake rm` and `/models/available` see it: the repos that can be served, and removal.

huggingface_hub scans the cache; a repo whose snapshot lacks what serving needs (a pull cut short) is named in a
warning instead of listed. A repo of GGUF files is listed once per quantization it holds whole (every part of a
split one), as `org/name:TAG`, the MODEL that serves that file (a bare `org/name` would take llama.cpp's default,
which may be one not pulled); `cake rm org/name:TAG` removes that quantization's files only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from cake_py.errors import ModelError, ModelNotFoundError
from cake_py.models import hub_gguf
from cake_py.models.hub import check_repo_id, one_line, repo_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedModel:
    repo_id: str
    size_bytes: int
    revisions: tuple[str, ...]
    path: Path  # the repo's folder; a GGUF quantization's first file
    tag: str | None = None  # a GGUF quantization (Q4_K_M)

    @property
    def model_id(self) -> str:
        """The MODEL that serves it: `org/name`, or `org/name:TAG` for a GGUF quantization."""
        return f"{self.repo_id}:{self.tag}" if self.tag else self.repo_id


def list_cached() -> list[CachedModel]:
    """The model repos of the HF cache that can be served; one whose current snapshot lacks its config.json or
    weights (a pull that failed or was interrupted, or a repo of another format) is named in a warning instead."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(constants.HF_HUB_CACHE)  # read now (its default is bound when imported)
    except CacheNotFound:
        return []
    except (OSError, ValueError) as error:  # HF_HUB_CACHE is a file, unreadable, …
        raise ModelError(f"cannot read the HF cache {constants.HF_HUB_CACHE!r}: {error}") from None
    for warning in info.warnings:  # a broken download or a damaged repo: not listed, but said
        log.warning("skipped in the HF cache: %s (cake rm it, then cake pull it again)", one_line(warning))
    models = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        if not repo.revisions:  # an empty snapshots/ (a pull stopped before its first file)
            log.warning(
                "not listed: %s has no snapshot in the HF cache: cake pull %s to fetch it, or cake rm %s",
                repo.repo_id,
                repo.repo_id,
                repo.repo_id,
            )
            continue
        current = max(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified))
        snapshot = Path(current.snapshot_path)
        revisions = tuple(r.commit_hash for r in repo.revisions)
        files = _snapshot_files(snapshot)
        quantized = _quantizations(repo.repo_id, snapshot, files, revisions)
        missing = _missing_files(snapshot)
        if missing is None:
            models.append(CachedModel(repo.repo_id, repo.size_on_disk, revisions, Path(repo.repo_path)))
        elif not quantized:
            if hub_gguf.quantizations(files):
                missing = "parts of its split GGUF"
            log.warning(
                "not listed: %s lacks %s in the HF cache (a pull cut short?): cake pull %s to finish it, or cake rm %s",
                repo.repo_id,
                missing,
                repo.repo_id,
                repo.repo_id,
            )
            continue
        models.extend(quantized)
    return sorted(models, key=lambda m: m.model_id)


def _snapshot_files(snapshot: Path) -> list[str]:
    """A snapshot's files (links whose blob is there), as the Hub names them: `sub/name.gguf`."""
    return sorted(path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if path.is_file())


def _quantizations(repo_id: str, snapshot: Path, files: list[str], revisions: tuple[str, ...]) -> list[CachedModel]:
    """The GGUF quantizations a snapshot (whose `files` these are) holds whole (a split one with every part), each
    as its `org/name:TAG`."""
    found = []
    for tag in hub_gguf.quantizations(files):
        chosen = hub_gguf.choose(repo_id, files, tag)
        if not hub_gguf.complete(chosen):  # a split file some of whose parts are not (yet) here
            continue
        size = sum((snapshot / name).stat().st_size for name in chosen)
        found.append(CachedModel(repo_id, size, revisions, snapshot / chosen[0], tag))
    return found


def _missing_files(snapshot: Path) -> str | None:
    """What a snapshot lacks of config.json and its safetensors weights (the shard index's files), or None."""
    if not (snapshot / "config.json").is_file():  # a GGUF repo's quantizations are listed by their tags
        return "config.json"
    if (snapshot / "model.safetensors").is_file():
        return None
    index = snapshot / "model.safetensors.index.json"
    if not index.is_file():
        return "model.safetensors"
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "a readable model.safetensors.index.json"
    absent = [str(shard) for shard in shards if not (snapshot / str(shard)).is_file()]
    if not shards or absent:
        return ", ".join(absent[:3]) + (f" and {len(absent) - 3} more" if len(absent) > 3 else "") or "its shards"
    return None


def remove_cached(model: str) -> int:
    """Delete `model`'s files from the HF cache; returns the bytes freed. A repo id removes the repo's folder, every
    revision (as huggingface_hub does when all of a repo's revisions are deleted; a half-downloaded repo that
    scanning skips too); `org/name:TAG` removes that GGUF quantization's files, and the folder once no GGUF and no
    checkpoint is left in it."""
    repo_id, tag = hub_gguf.split_tag(model)
    check_repo_id(repo_id)
    folder = repo_folder(repo_id)
    if not folder.is_dir():
        raise ModelNotFoundError(f"model {repo_id!r} is not in the HF cache")
    if tag is not None:
        return _remove_quantization(repo_id, tag, folder)
    return _remove_folder(folder)


def _remove_folder(folder: Path) -> int:
    freed = 0
    for root, _, files in os.walk(folder):
        for name in files:
            status = os.lstat(os.path.join(root, name))
            freed += status.st_size if stat.S_ISREG(status.st_mode) else 0  # blobs; snapshots only link to them
    try:
        shutil.rmtree(folder)
    except OSError as error:
        raise ModelError(f"cannot remove {str(folder)!r}: {error}") from None
    return freed


def _remove_quantization(repo_id: str, tag: str, folder: Path) -> int:
    """Unlink the files `tag` picks in every snapshot, then delete the blobs no other snapshot file links to."""
    snapshots = [path for path in (folder / "snapshots").glob("*") if path.is_dir()]
    targets: set[Path] = set()
    freed = removed = 0
    try:
        for snapshot in snapshots:
            files = _snapshot_files(snapshot)
            if not hub_gguf.quantizations(files):
                continue
            try:
                chosen = hub_gguf.choose(repo_id, files, tag)
            except ModelNotFoundError:  # this revision does not hold it
                continue
            for name in chosen:
                path = snapshot / name
                if path.is_symlink():
                    targets.add(path.resolve())
                else:  # a cache of copies, not links
                    freed += path.stat().st_size
                path.unlink()
                removed += 1
                for parent in path.parents:  # a quantization's own subfolder (big split files are published so)
                    if parent == snapshot or any(parent.iterdir()):
                        break
                    parent.rmdir()
        if not removed:
            held = sorted({held for path in snapshots for held in hub_gguf.quantizations(_snapshot_files(path))})
            raise ModelNotFoundError(
                f"{repo_id!r} has no GGUF matching {tag!r} in the HF cache; it holds: {', '.join(held) or 'no GGUF'}"
            )
        linked = {path.resolve() for snapshot in snapshots for path in snapshot.rglob("*") if path.is_symlink()}
        for blob in targets - linked:
            if blob.is_file():
                freed += blob.stat().st_size
                blob.unlink()
        if not any(_missing_files(s) is None or hub_gguf.quantizations(_snapshot_files(s)) for s in snapshots):
            freed += _remove_folder(folder)  # nothing servable is left of the repo
    except OSError as error:
        raise ModelError(f"cannot remove {repo_id}:{tag} from {str(folder)!r}: {error}") from None
    return freed
