"""Shared fixtures: tiny random-weight HF model folders, written once per test session."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# The repository root, so that `cake_py` and `tests.fixtures` import without installing the package.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.fixtures.tiny_models import with_special_tokens, write_tiny_model  # noqa: E402

TinyModelFactory = Callable[..., Path]

pytest_plugins = ["tests.fixtures.no_skip"]  # CAKE_NO_SKIP=1: a skipped test fails the run


@pytest.fixture(scope="session", autouse=True)
def _private_data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The Files and Batch APIs keep what they store under $XDG_DATA_HOME: in tests, a session's own folder, never
    the user's (and the `cake serve` processes tests start inherit it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("data_home")))
        yield


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> TinyModelFactory:
    """`factory(kind, sharded=False)` → a folder holding that tiny model, written on first use and then reused.

    The folders are shared by the whole session: tests that damage a model must copy it first.
    """
    root = tmp_path_factory.mktemp("tiny_models")
    folders: dict[tuple[str, bool], Path] = {}

    def factory(kind: str, *, sharded: bool = False) -> Path:
        key = (kind, sharded)
        if key not in folders:
            folders[key] = write_tiny_model(root / f"{kind}{'-sharded' if sharded else ''}", kind, sharded=sharded)
        return folders[key]

    return factory


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory: TinyModelFactory) -> Path:
    """The tiny GQA Llama (untied head) folder."""
    return tiny_model_factory("llama")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--gpu", action="store_true", default=False, help="run tests/gpu (needs CUDA; CI has no GPU)")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/gpu is collected only with --gpu: CI has no GPU, and there those tests fail rather than skip."""
    if collection_path == REPO_ROOT / "tests" / "gpu" and not config.getoption("--gpu"):
        return True
    return None


@pytest.fixture(scope="session")
def tiny_llama_reasoning(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama behind a reasoning model's template: it opens a thinking block for the model (as DeepSeek-R1's
    does) unless enable_thinking is false (as Qwen3's), and leaves past answers' thinking out."""
    folder = tmp_path_factory.mktemp("reasoning") / "llama"
    shutil.copytree(tiny_llama, folder)
    config_path = folder / "tokenizer_config.json"
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{{ m.content.split('</think>')[-1] if m.role == 'assistant' else m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n"
        "{% endif %}{% endif %}"
    )
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "chat_template": template}))
    return folder


@pytest.fixture(scope="session")
def tiny_llama_long_context(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a 2048-token context (the fixture's is 512): for prompts holding tool descriptions."""
    folder = tmp_path_factory.mktemp("long-context") / "llama"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    return folder


@pytest.fixture(scope="session")
def tiny_llama_fim(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with fill-in-the-middle tokens (Qwen2.5-Coder's names): its last three BPE merges' tokens
    become the special tokens <|fim_prefix|>, <|fim_suffix|> and <|fim_middle|> (same ids, same embeddings)."""
    folder = tmp_path_factory.mktemp("fim") / "llama"
    shutil.copytree(tiny_llama, folder)
    path = folder / "tokenizer.json"
    names = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
    tokenizer = with_special_tokens(json.loads(path.read_text()), names)
    path.write_text(json.dumps(tokenizer))
    return folder
