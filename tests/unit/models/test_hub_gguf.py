"""Hub repos of GGUF files (llama.cpp's `-hf org/name-GGUF:Q4_K_M`): the tag picks the file(s), only those are
downloaded, offline they come from the HF cache, and a tag that fits nothing is one line naming what there is."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gguf
import pytest
from huggingface_hub import constants

from cake_py.api.management import _available
from cake_py.errors import ModelNotFoundError
from cake_py.models.gguf import GGUFWeights
from cake_py.models.hub import resolve_model
from cake_py.models.hub_gguf import choose, quantizations
from tests.fixtures.fake_hub import fake_hub, folder_files
from tests.fixtures.gguf_split import split_gguf
from tests.unit.models.test_gguf import _write_gguf
from tests.unit.models.test_hub import _cake, _hub_env

BARTOWSKI = [
    "README.md",
    "Qwen2.5-7B-Instruct-IQ2_M.gguf",
    "Qwen2.5-7B-Instruct-Q4_0.gguf",
    "Qwen2.5-7B-Instruct-Q4_K_M.gguf",
    "Qwen2.5-7B-Instruct-f16-00002-of-00002.gguf",
    "Qwen2.5-7B-Instruct-f16-00001-of-00002.gguf",
    "mmproj-Qwen2.5-7B-Instruct-Q4_K_M.gguf",
]


def test_the_tag_picks_the_files_as_llama_cpp_does() -> None:
    assert choose("o/r", BARTOWSKI, "q4_k_m") == ["Qwen2.5-7B-Instruct-Q4_K_M.gguf"]  # any case; no mmproj
    assert choose("o/r", BARTOWSKI, "F16") == [  # every part of a split one, the first first
        "Qwen2.5-7B-Instruct-f16-00001-of-00002.gguf",
        "Qwen2.5-7B-Instruct-f16-00002-of-00002.gguf",
    ]
    assert choose("o/r", BARTOWSKI, None) == ["Qwen2.5-7B-Instruct-Q4_K_M.gguf"]  # llama.cpp's "latest"
    no_q4_k_m = [name for name in BARTOWSKI if "Q4_K_M" not in name]
    assert choose("o/r", no_q4_k_m, None) == ["Qwen2.5-7B-Instruct-Q4_0.gguf"]  # then a Q4
    assert choose("o/r", ["b-Q8_0.gguf", "a-Q6_K.gguf"], None) == ["a-Q6_K.gguf"]  # then the first
    assert quantizations(BARTOWSKI) == ["IQ2_M", "Q4_0", "Q4_K_M", "F16"]
    with pytest.raises(ModelNotFoundError, match=r"'o/r' has no GGUF matching 'Q5_K_S'; .*: IQ2_M, Q4_0, Q4_K_M, F16$"):
        choose("o/r", BARTOWSKI, "Q5_K_S")
    with pytest.raises(ModelNotFoundError, match="'o/r' has no GGUF file: the tag 'Q4_K_M' picks"):
        choose("o/r", ["config.json", "model.safetensors"], "Q4_K_M")
    with pytest.raises(ModelNotFoundError, match="not of the form 'org/name' or 'org/name:QUANT'"):
        resolve_model("org/name:")
    with pytest.raises(ModelNotFoundError, match=r"^':Q4' is not of the form"):  # it named '', not what was given
        resolve_model(":Q4")


@pytest.fixture(scope="module")
def gguf_repo(tiny_model_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A Hub repo of the tiny Llama as a whole Q8_0 GGUF, a split "Q4_K_M" one (3 parts) and a projector."""
    folder = tmp_path_factory.mktemp("gguf-repo")
    whole = _write_gguf(
        tiny_model_factory("llama"), folder / "tiny-Q8_0.gguf", lambda _: gguf.GGMLQuantizationType.Q8_0
    )
    (folder / "split").mkdir()
    split_gguf(whole, folder / "split" / "tiny-Q4_K_M.gguf", 10)
    files = {**folder_files(folder), **folder_files(folder / "split")}
    return {**files, "mmproj-tiny-F16.gguf": b"not a model", "README.md": b"hi"}


def _downloaded(hf_home: Path, repo_id: str) -> list[str]:
    snapshots = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return sorted(path.name for path in snapshots.glob("*/*"))


def test_a_gguf_repo_and_tag_download_only_the_chosen_files_and_load_offline(
    gguf_repo: dict[str, bytes], tiny_model_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hf_home = tmp_path / "hf"
    parts = [f"tiny-Q4_K_M-0000{n}-of-00003.gguf" for n in (1, 2, 3)]
    repos = {"org/tiny-GGUF": gguf_repo, "org/tiny": folder_files(tiny_model_factory("llama"))}
    with fake_hub(repos) as endpoint:
        env = _hub_env(hf_home, endpoint)
        pulled = _cake(env, "pull", "org/tiny-GGUF:q4_k_m")
        assert pulled.returncode == 0, pulled.stderr
        assert Path(pulled.stdout.strip()).name == parts[0]
        assert _downloaded(hf_home, "org/tiny-GGUF") == parts  # no Q8_0, no projector
        refused = _cake(env, "pull", "org/tiny-GGUF:Q5_K_S")
        assert refused.returncode == 1
        assert refused.stderr == (
            "cake: error: Hub repo 'org/tiny-GGUF' has no GGUF matching 'Q5_K_S'; its quantizations: Q4_K_M, Q8_0\n"
        )
        not_gguf = _cake(env, "pull", "org/tiny:Q4_K_M")
        assert not_gguf.returncode == 1 and "'org/tiny' has no GGUF file" in not_gguf.stderr, not_gguf.stderr
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
        bare = resolve_model("org/tiny-GGUF")  # a GGUF-only repo without a tag: Q4_K_M, as llama.cpp's default
        assert bare.model_id == "org/tiny-GGUF" and isinstance(bare.weights, GGUFWeights)
        assert len(bare.weights.parts) == 3
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no Hub: the cached snapshot's files are chosen from
    source = resolve_model("org/tiny-GGUF:Q4_K_M")
    assert source.model_id == "org/tiny-GGUF:Q4_K_M" and source.config.n_layers == 3
    assert source.weights.path.name == parts[0]
    with pytest.raises(ModelNotFoundError, match="has no GGUF matching 'Q8_0'; its quantizations: Q4_K_M$"):
        resolve_model("org/tiny-GGUF:Q8_0")  # offline, only what the cache holds can be chosen


def test_a_silent_hub_fails_a_tagged_model_in_one_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The repo's file list is asked with model_info: list_repo_files retried a silent Hub for over a minute."""
    import socket
    import time

    from cake_py.models import hub

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts (the kernel does), never answers
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HUB_READ_TIMEOUT_S", 0.5)
    began = time.monotonic()
    try:
        with pytest.raises(ModelNotFoundError, match=r"'org/m' is not in the HF cache .* \(offline: timed out\)$"):
            resolve_model("org/m:Q4_K_M")
    finally:
        silent.close()
    assert time.monotonic() - began < 10


def test_cached_quantizations_are_listed_and_removed_by_tag(
    gguf_repo: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cake list` names each pulled quantization as the MODEL that serves it (a bare id would take the default,
    maybe one not pulled), a split one in a subfolder (as big files are published) included; `cake rm org/name:TAG`
    removes that one's files only, and the repo once nothing servable is left."""
    hf_home = tmp_path / "hf"
    repo = {(f"tiny-Q4_K_M/{name}" if "-of-" in name else name): data for name, data in gguf_repo.items()}
    with fake_hub({"org/tiny-GGUF": repo}) as endpoint:
        env = _hub_env(hf_home, endpoint)
        for tag in ("Q8_0", "Q4_K_M"):
            pulled = _cake(env, "pull", f"org/tiny-GGUF:{tag}")
            assert pulled.returncode == 0, pulled.stderr
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    listed = _cake(offline, "list")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert [row[0] for row in rows] == ["org/tiny-GGUF:Q4_K_M", "org/tiny-GGUF:Q8_0"], listed.stdout
    assert Path(rows[0][2]).name == "tiny-Q4_K_M-00001-of-00003.gguf" and Path(rows[0][2]).parent.name == "tiny-Q4_K_M"
    assert Path(rows[1][2]).name == "tiny-Q8_0.gguf"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))  # /models/available lists them so too
    state = SimpleNamespace(source=None, served_models=[], configured_model=None, settings=None)
    available = {model["model_id"]: model["load_as"] for model in _available(state)}  # type: ignore[arg-type]
    assert available["org/tiny-GGUF:Q8_0"] == "org/tiny-GGUF:Q8_0" and "org/tiny-GGUF" not in available
    snapshot = Path(rows[1][2]).parent
    blobs = hf_home / "hub" / "models--org--tiny-GGUF" / "blobs"
    q8_bytes = (snapshot / "tiny-Q8_0.gguf").stat().st_size
    assert sum(float(row[1].split()[0]) for row in rows) * 1e6 == pytest.approx(
        sum(blob.stat().st_size for blob in blobs.iterdir()), abs=1e5
    )

    unknown = _cake(offline, "rm", "org/tiny-GGUF:Q5_K_S")
    assert unknown.returncode == 1
    assert unknown.stderr == (
        "cake: error: 'org/tiny-GGUF' has no GGUF matching 'Q5_K_S' in the HF cache; it holds: Q4_K_M, Q8_0\n"
    )
    removed = _cake(offline, "rm", "org/tiny-GGUF:q8_0")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout == f"removed org/tiny-GGUF:q8_0 ({q8_bytes / 1e6:.1f} MB freed)\n"
    assert not (snapshot / "tiny-Q8_0.gguf").exists() and len(list(blobs.iterdir())) == 3  # the 3 parts' blobs
    assert [line.split("\t")[0] for line in _cake(offline, "list").stdout.splitlines()] == ["org/tiny-GGUF:Q4_K_M"]
    served = _cake(offline, "run", "org/tiny-GGUF:Q4_K_M", "hi", "--max-tokens", "2")
    assert served.returncode == 0, served.stderr

    (snapshot / "tiny-Q4_K_M" / "tiny-Q4_K_M-00002-of-00003.gguf").unlink()  # a split file missing a part
    partial = _cake(offline, "list")
    assert partial.stdout == "" and "org/tiny-GGUF lacks parts of its split GGUF" in partial.stderr, partial.stderr
    _cake(env, "rm", "org/tiny-GGUF:Q4_K_M")
    assert not (hf_home / "hub" / "models--org--tiny-GGUF").exists()  # nothing servable was left
