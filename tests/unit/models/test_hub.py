"""Model resolution: Hub ids through huggingface_hub's standard cache (offline here), folders, GGUF, errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cake_py.errors import ModelNotFoundError
from cake_py.models.hub import HUB_IGNORED, HUB_PATTERNS, embedded_model_path, resolve_model


def make_hf_cache(cache: Path, repo_id: str, model_folder: Path) -> Path:
    """Lay a model out exactly as huggingface_hub stores a download: blobs, snapshots/<commit>, refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in model_folder.iterdir():
        blob = repo / "blobs" / f"blob-{file.name}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snapshot


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_hub_id_resolves_from_the_hf_cache_offline(tmp_path: Path, tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    import os

    hf_home = tmp_path / "hf"
    make_hf_cache(hf_home / "hub", "tiny-org/tiny-llama", tiny_model_factory("llama"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    code = (
        "from cake_py.models.hub import resolve_model, list_cached\n"
        "s = resolve_model('tiny-org/tiny-llama')\n"
        "print(s.model_id, s.config.n_layers, s.weights.path)\n"
        "print([m.repo_id for m in list_cached()])\n"
    )
    result = run_python(code, env)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert first.startswith("tiny-org/tiny-llama 3 ")
    assert "snapshots" in first
    assert "tiny-org/tiny-llama" in second
    # and `cake rm` deletes it through huggingface_hub
    removed = subprocess.run(
        [sys.executable, "-m", "cake_py.cli", "rm", "tiny-org/tiny-llama"], capture_output=True, text=True, env=env
    )
    assert removed.returncode == 0, removed.stderr
    assert run_python(code, env).returncode != 0


def test_folder_and_embedded_default(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    folder = tiny_model_factory("qwen3")
    assert resolve_model(str(folder)).config.family == "qwen3"
    assert embedded_model_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_missing_paths_are_named(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="missing-dir"):
        resolve_model(str(tmp_path / "missing-dir"))
    with pytest.raises(ModelNotFoundError, match="x.gguf"):
        resolve_model(str(tmp_path / "x.gguf"))
    with pytest.raises(ModelNotFoundError, match="a/b/c"):
        resolve_model("a/b/c")


def test_model_paths_that_are_not_models_are_named(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="neither a model folder nor a .gguf file"):
        resolve_model(str(weights))  # a file inside a model folder, not the folder
    with pytest.raises(ModelNotFoundError, match="GGUF file .*UPPER.GGUF"):
        resolve_model(str(tmp_path / "UPPER.GGUF"))  # the suffix in capitals is still a GGUF
    with pytest.raises(ModelNotFoundError, match="no such user"):
        resolve_model("~no-such-user-here/model")


def test_hub_downloads_skip_mistral_consolidated_weights() -> None:
    from huggingface_hub.utils import filter_repo_objects

    files = [
        "config.json",
        "model-00001-of-00003.safetensors",
        "model.safetensors.index.json",
        "consolidated.safetensors",
        "original/consolidated.00.pth",
        "params.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "pytorch_model.bin",
    ]
    kept = list(filter_repo_objects(files, allow_patterns=HUB_PATTERNS, ignore_patterns=HUB_IGNORED))
    assert "consolidated.safetensors" not in kept and "pytorch_model.bin" not in kept
    assert {"config.json", "model-00001-of-00003.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(kept)
