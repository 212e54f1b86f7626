"""The HF cache as `cake list`, `cake rm` and `/models/available` see it: the repos that can be served, and removal.

huggingface_hub scans the cache; a repo whose snapshot lacks what serving needs (a pull cut short) is named in a
warning instead of listed.
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
from cake_py.models.hub import check_repo_id, one_line, repo_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedModel:
    repo_id: str
    size_bytes: int
    revisions: tuple[str, ...]
    path: Path


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
        missing = _missing_files(Path(current.snapshot_path))
        if missing:
            log.warning(
                "not listed: %s lacks %s in the HF cache (a pull cut short?): cake pull %s to finish it, or cake rm %s",
                repo.repo_id,
                missing,
                repo.repo_id,
                repo.repo_id,
            )
            continue
        revisions = tuple(r.commit_hash for r in repo.revisions)
        models.append(CachedModel(repo.repo_id, repo.size_on_disk, revisions, Path(repo.repo_path)))
    return sorted(models, key=lambda m: m.repo_id)


def _missing_files(snapshot: Path) -> str | None:
    """What a snapshot lacks of config.json and its safetensors weights (the shard index's files), or None."""
    if not (snapshot / "config.json").is_file():  # a GGUF repo's pulled quantization (cake pull org/name:Q4_K_M)
        return None if any(snapshot.glob("*.gguf")) else "config.json"
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


def remove_cached(repo_id: str) -> int:
    """Delete `repo_id`'s folder from the HF cache, every revision (as huggingface_hub does when all of a repo's
    revisions are deleted); returns the bytes freed. A half-downloaded repo that scanning skips is removed too."""
    check_repo_id(repo_id)
    folder = repo_folder(repo_id)
    if not folder.is_dir():
        raise ModelNotFoundError(f"model {repo_id!r} is not in the HF cache")
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
