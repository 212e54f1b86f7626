"""Model resolution: Hub ids through huggingface_hub's standard cache (offline here), folders, GGUF, errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cake_py.errors import HubError, ModelError, ModelNotFoundError
from cake_py.models.hub import HUB_IGNORED, HUB_PATTERNS, embedded_model_path, resolve_model
from tests.fixtures.fake_hub import HubBehaviour, fake_hub, folder_files


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
        "from cake_py.models.hub import resolve_model\nfrom cake_py.models.hf_cache import list_cached\n"
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


def test_a_cached_repo_whose_blob_is_gone_is_called_damaged(tmp_path: Path, tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    """Offline, a snapshot whose link outlived its blob said the repo "has no config.json" (as if it never had)."""
    import os

    hf_home = tmp_path / "hf"
    snapshot = make_hf_cache(hf_home / "hub", "tiny-org/tiny-llama", tiny_model_factory("llama"))
    (snapshot / "model.safetensors").resolve().unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "cake_py.cli", "run", "tiny-org/tiny-llama", "hi"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "copy of 'tiny-org/tiny-llama' is damaged: model.safetensors in" in result.stderr
    assert "cake rm tiny-org/tiny-llama" in result.stderr


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
    with pytest.raises(ModelError, match="neither a model folder nor a .gguf file") as refused:
        resolve_model(str(weights))  # a file inside a model folder, not the folder
    assert not isinstance(refused.value, ModelNotFoundError)  # it is there: a bad model, not a missing one
    with pytest.raises(ModelNotFoundError, match="GGUF file .*UPPER.GGUF"):
        resolve_model(str(tmp_path / "UPPER.GGUF"))  # the suffix in capitals is still a GGUF
    with pytest.raises(ModelNotFoundError, match="no such user"):
        resolve_model("~no-such-user-here/model")
    for name in ("a" * 5000 + ".gguf", "a" * 5000, f"/tmp/{'b' * 300}/x"):  # past the OS's name length
        with pytest.raises(ModelNotFoundError, match="cannot be looked up: File name too long"):
            resolve_model(name)


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
        "checkpoint-100/model.safetensors",  # fnmatch's * matches "/": these were downloaded and never used
        "onnx/model.safetensors",
        "text_encoder/model.safetensors",
        "1_Pooling/config.json",  # read for the embedding pooling
    ]
    kept = list(filter_repo_objects(files, allow_patterns=HUB_PATTERNS, ignore_patterns=HUB_IGNORED))
    assert "consolidated.safetensors" not in kept and "pytorch_model.bin" not in kept
    assert not [name for name in kept if "/" in name and name.endswith(".safetensors")], kept
    assert {"config.json", "model-00001-of-00003.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(kept)
    assert "1_Pooling/config.json" in kept


def _cake(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "cake_py.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def test_pull_list_rm_through_huggingface_hub_from_a_hub_over_http(tmp_path: Path, tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    import os

    tiny = folder_files(tiny_model_factory("llama"))
    repos = {
        "org/good": {
            **tiny,
            "checkpoint-100/model.safetensors": tiny["model.safetensors"],
            "1_Pooling/config.json": b"{}",
        },
        "org/renamed": tiny,  # the same commit as org/good: removing one must leave the other
        "org/bin-only": {"config.json": tiny["config.json"], "pytorch_model.bin": b"x" * 100},
        "org/gguf-only": {"README.md": b"hi", "model.Q4_0.gguf": b"GGUF"},
    }
    hf_home = tmp_path / "hf"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    with fake_hub(repos) as endpoint:
        env.update(HF_HOME=str(hf_home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_PROGRESS_BARS="1")
        for repo in ("org/good", "org/renamed"):
            pulled = _cake(env, "pull", repo)
            assert pulled.returncode == 0, pulled.stderr
            assert (Path(pulled.stdout.strip()) / "model.safetensors").is_file()
        snapshot = Path(_cake(env, "pull", "org/good").stdout.strip())
        assert (snapshot / "1_Pooling" / "config.json").is_file() and not (snapshot / "checkpoint-100").exists()
        refused = _cake(env, "pull", "org/bin-only")
        assert refused.returncode == 1
        assert refused.stderr.count("\n") == 1 and "no config.json with model.safetensors" in refused.stderr
        assert not (hf_home / "hub" / "models--org--bin-only").exists()  # nothing left behind
        gguf_only = _cake(env, "pull", "org/gguf-only")  # its GGUF, as llama.cpp's -hf takes it (test_hub_gguf.py)
        assert gguf_only.returncode == 0 and gguf_only.stdout.endswith("/model.Q4_0.gguf\n"), gguf_only.stderr
        missing = _cake(env, "pull", "org/nope")
        assert missing.returncode == 1
        assert missing.stderr == "cake: error: model 'org/nope' is not on the Hub (or is private: set HF_TOKEN)\n"
    listed = _cake(env, "list")
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == [
        "org/gguf-only:Q4_0",
        "org/good",
        "org/renamed",
    ]
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    removed = _cake(offline, "rm", "org/renamed")
    assert removed.returncode == 0 and removed.stdout.startswith("removed org/renamed ("), removed.stderr
    assert [line.split("\t")[0] for line in _cake(offline, "list").stdout.splitlines()] == [
        "org/gguf-only:Q4_0",
        "org/good",
    ]
    answer = _cake(offline, "run", "org/good", "Hello", "--max-tokens", "2", "--dtype", "float32")
    assert answer.returncode == 0, answer.stderr  # served from the cache, no Hub


def test_an_hf_cache_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    import os

    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("x")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(not_a_folder))
    listed = _cake(env, "list")
    assert listed.returncode == 1 and listed.stderr.startswith("cake: error: cannot read the HF cache")
    assert listed.stderr.count("\n") == 1


def test_the_cache_commands_say_a_path_is_no_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cake_py.models.hf_cache import remove_cached
    from cake_py.models.hub import download

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()  # `cake pull tiny` beside a folder tiny said "neither a local path nor a Hub id"
    for path in (str(tmp_path), "./folder", "~/x", "./some/local/folder", "tiny"):
        with pytest.raises(ModelNotFoundError, match="looks like a path, not a Hub id"):
            remove_cached(path)
        with pytest.raises(ModelNotFoundError, match="looks like a path, not a Hub id"):
            download(path)


def test_a_hub_that_accepts_and_says_nothing_fails_in_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub waits for ever by default: `cake pull` hung until killed."""
    import socket
    import time

    from huggingface_hub import constants

    from cake_py.models import hub

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts (the kernel does), never answers
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HUB_READ_TIMEOUT_S", 0.5)
    began = time.monotonic()
    try:
        with pytest.raises(
            ModelNotFoundError, match="'org/model' is not in the HF cache and the Hub cannot be reached"
        ):
            hub.download("org/model")
    finally:
        silent.close()
    assert time.monotonic() - began < 20


def test_cake_list_says_which_repos_it_skips(tmp_path: Path) -> None:
    import os

    broken = tmp_path / "hub" / "models--org--broken"
    (broken / "refs").mkdir(parents=True)
    (broken / "refs" / "main").write_text("0" * 40)  # a snapshot that is not there: a download cut short
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"))
    listed = _cake(env, "list")
    assert listed.returncode == 0 and listed.stdout == ""
    assert "skipped in the HF cache" in listed.stderr and "models--org--broken" in listed.stderr, listed.stderr


def test_the_cache_commands_start_without_torch(tmp_path: Path) -> None:
    """`cake list`, `pull` and `rm` only look at the HF cache and the Hub: importing torch (3 s and more) made each
    take seconds before it read a file."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    code = (
        "import sys\nfrom cake_py.cli import main\n"
        "commands = [['list'], ['pull', 'org/model'], ['pull', 'org/model:Q4_K_M'], ['rm', 'org/model']]\n"
        "codes = [main(command) for command in commands]\n"
        "print(codes, 'torch' in sys.modules)\n"
    )
    result = run_python(code, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0, 1, 1, 1] False", result.stderr  # each ran (the last three fail), no torch
    assert result.stderr.count("is not in the HF cache") == 3, result.stderr


def test_cake_list_of_an_empty_cache_says_so_on_stderr(tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(tmp_path / "nothing-here"))
    listed = _cake(env, "list")
    assert listed.returncode == 0 and listed.stdout == ""  # scripts reading the list get an empty one
    assert "no models in the HF cache" in listed.stderr and "nothing-here" in listed.stderr, listed.stderr


def _hub_env(hf_home: Path, endpoint: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HOME": str(hf_home), "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def _refusing_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connections to it are refused."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_a_file_server_that_refuses_connections_is_one_line(tmp_path: Path, tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    """huggingface_hub raises httpx's ConnectError once its retries end: `cake pull` printed its traceback."""
    behaviour = HubBehaviour(weights_at=_refusing_url())  # the Hub answers; its CDN does not
    with fake_hub({"org/tiny": folder_files(tiny_model_factory("llama"))}, behaviour) as endpoint:
        pulled = _cake(_hub_env(tmp_path / "hf", endpoint), "pull", "org/tiny")
    assert pulled.returncode == 1 and "Traceback" not in pulled.stderr, pulled.stderr
    lines = [line for line in pulled.stderr.splitlines() if "WARNING" not in line]
    assert len(lines) == 1 and lines[0].startswith("cake: error: cannot download 'org/tiny': the Hub or its file")
    assert "stopped answering (ConnectError" in lines[0] and "resumes" in lines[0], lines[0]


def test_http_errors_of_the_hub_say_its_status_not_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 403 or a 503 of the Hub read "the Hub cannot be reached (offline: … check your internet connection …)"."""
    from huggingface_hub import constants

    from cake_py.models import hub

    errors = {
        "/api/models/org/forbidden": (403, "Your token does not have read access"),
        "/api/models/org/down": (503, "Service temporarily unavailable"),
    }
    with fake_hub({}, HubBehaviour(errors=errors)) as endpoint:
        env = _hub_env(tmp_path / "hf", endpoint)
        forbidden = _cake(env, "pull", "org/forbidden")
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        with pytest.raises(HubError) as down:  # the Hub's failure, not the model's: /models/load answers 502
            hub.download("org/down")
    assert forbidden.returncode == 1 and "Traceback" not in forbidden.stderr, forbidden.stderr
    assert forbidden.stderr == (
        "cake: error: cannot download 'org/forbidden': the Hub answered HTTP 403: Your token does not have read "
        "access; check HF_TOKEN's permissions\n"
    )
    assert str(down.value) == (
        "cannot download 'org/down': the Hub answered HTTP 503: Service temporarily unavailable; try again later"
    )


def test_list_names_a_pull_cut_short_instead_of_listing_it(  # type: ignore[no-untyped-def]
    tmp_path: Path, tiny_model_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot without its config.json or weights (a failed or interrupted pull) was listed as a model of 0 MB."""
    import os

    from huggingface_hub import constants

    from cake_py.models.hf_cache import list_cached

    cache = tmp_path / "hub"
    make_hf_cache(cache, "org/good", tiny_model_factory("llama"))
    make_hf_cache(cache, "org/sharded", tiny_model_factory("llama", sharded=True))
    make_hf_cache(cache, "org/no-weights", tiny_model_factory("llama"))
    (cache / "models--org--no-weights" / "blobs" / "blob-model.safetensors").unlink()
    (next((cache / "models--org--no-weights" / "snapshots").iterdir()) / "model.safetensors").unlink()
    make_hf_cache(cache, "org/a-shard-short", tiny_model_factory("llama", sharded=True))
    shard = next((cache / "models--org--a-shard-short" / "snapshots").glob("*/model-00002-*.safetensors"))
    shard.resolve().unlink()
    shard.unlink()
    (cache / "models--org--no-snapshot" / "snapshots").mkdir(parents=True)  # stopped before its first file
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(cache))
    listed = _cake(env, "list")
    assert listed.returncode == 0, listed.stderr
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == ["org/good", "org/sharded"]
    assert "org/no-snapshot has no snapshot in the HF cache" in listed.stderr, listed.stderr  # max() of nothing
    for repo in ("org/no-weights", "org/a-shard-short"):
        assert f"cake pull {repo} to finish it, or cake rm {repo}" in listed.stderr, listed.stderr
    assert "model-00002-of-" in listed.stderr  # what is missing is named
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # the server's /models/available reads the same list
    assert [model.repo_id for model in list_cached()] == ["org/good", "org/sharded"]


def test_ctrl_c_stops_a_download_at_once_and_leaves_no_partial_file(tmp_path: Path) -> None:
    """huggingface_hub's thread pool made Ctrl-C wait for the whole download; a second one left `.incomplete`
    files in the cache for ever."""
    import signal
    import time

    weights = b"\0" * (4 << 20)  # 4 MiB at 1 KiB per 10 ms: minutes, unless interrupted
    repos = {"org/big": {"config.json": b"{}", "model.safetensors": weights}}
    hf_home = tmp_path / "hf"
    theirs = hf_home / "hub" / "models--org--big" / "blobs" / "0123abcd.incomplete"  # another pull's, under way
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"partial")
    # SIGINT ends Python with KeyboardInterrupt only where it is not ignored (a test run in the background).
    main = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    main += "from cake_py.cli import main; sys.exit(main(sys.argv[1:]))"
    with fake_hub(repos, HubBehaviour(trickle_s=0.01)) as endpoint:
        command = [sys.executable, "-c", main, "pull", "org/big"]
        env = _hub_env(hf_home, endpoint)
        with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as cake:
            try:
                deadline = time.monotonic() + 60
                while len(list(hf_home.glob("hub/*/blobs/*.incomplete"))) < 2 and time.monotonic() < deadline:
                    time.sleep(0.1)
                # Ours and theirs; for a moment config.json's partial too (3), on a machine slow to finish it.
                assert len(list(hf_home.glob("hub/*/blobs/*.incomplete"))) >= 2, "the download never started"
                time.sleep(0.5)
                cake.send_signal(signal.SIGINT)
                interrupted = time.monotonic()
                out, err = cake.communicate(timeout=30)
            finally:
                if cake.poll() is None:
                    cake.kill()
    assert time.monotonic() - interrupted < 5, err
    assert cake.returncode == 130, err
    assert err.startswith("cake: interrupted: the download of 'org/big' stopped") and err.count("\n") == 1, err
    assert out == "" and list(hf_home.glob("hub/**/*.incomplete")) == [theirs]  # only its own partial went


def test_a_gguf_whose_name_is_not_utf8_has_an_id_json_can_carry(tmp_path: Path) -> None:
    """A Latin-1 file name reached every JSON answer as surrogate escapes: /v1/models, /health and all were 500s."""
    import json
    import os

    link = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.gguf"))
    link.symlink_to(embedded_model_path())
    model_id = resolve_model(str(link)).model_id
    assert model_id == "caf\ufffd"
    json.dumps(model_id, ensure_ascii=False).encode("utf-8")
