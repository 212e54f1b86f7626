"""`cake run` (one answer streamed to stdout) and the HF cache commands: the model and prompt it is given, its
output to a closed pipe or a full disk, and a bad model named in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fixtures.cli import assert_one_line_error, base_env, cake


def test_run_on_a_tiny_model_streams_text(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    result = cake("run", str(tiny_model_factory("llama")), "hello", "--max-tokens", "5", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    drafting = cake(
        "run", str(tiny_model_factory("llama")), "hello", "--max-tokens", "5", "--dtype", "float32",
        "--speculative-tokens", "4",
    )  # fmt: skip
    assert drafting.returncode == 0 and drafting.stdout == result.stdout  # greedy: the same answer


def test_missing_model_path(tmp_path: Path) -> None:
    assert_one_line_error(cake("run", str(tmp_path / "nope"), "hi"), "nope", "does not exist")


def test_missing_gguf(tmp_path: Path) -> None:
    assert_one_line_error(cake("run", str(tmp_path / "model.gguf"), "hi"), "model.gguf")


def test_bad_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 100)
    assert_one_line_error(cake("run", str(bad), "hi"), "bad.gguf")


def test_unknown_architecture(tmp_path: Path, tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FancyNetForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    assert_one_line_error(cake("run", str(folder), "hi"), "FancyNetForCausalLM")


def test_unknown_hub_id_offline(tmp_path: Path) -> None:
    env = {**base_env(), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    assert_one_line_error(cake("run", "nobody/no-such-model", "hi", env=env), "nobody/no-such-model")


@pytest.mark.parametrize("command", [("rm", "nobody/absent")])
def test_cache_commands_offline(tmp_path: Path, command: tuple[str, ...]) -> None:
    env = {**base_env(), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    assert_one_line_error(cake(*command, env=env), "nobody/absent")


def test_run_renders_with_the_chat_template_given(tiny_llama: Path) -> None:
    from cake_py.engine.oneshot import run_prompt
    from cake_py.models.hub import resolve_model
    from cake_py.models.sampling import SamplingParams

    model = tiny_llama
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    tokenizer = resolve_model(str(model)).tokenizer
    expected = run_prompt(str(model), "[user] hi\n", params, lambda _: None, dtype="float32", device="cpu", raw=True)
    given = run_prompt(
        str(model), "hi", params, lambda _: None, dtype="float32", device="cpu",
        chat_template="{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}",
    )  # fmt: skip
    assert given == expected
    assert tokenizer.render_chat([{"role": "user", "content": "hi"}]) != "[user] hi\n"  # its own is another


def test_cake_run_output_problems_and_a_prompt_that_is_not_utf8(tiny_llama: Path) -> None:
    """Each was a traceback: a prompt of bytes that are not UTF-8, a pipe closed early, a full disk."""
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    not_utf8 = subprocess.run(
        [sys.executable, "-m", "cake_py.cli", "run", str(tiny_llama), os.fsdecode(b"ab\xffcd")],
        capture_output=True, text=True, timeout=120, env=environment,
    )  # fmt: skip
    assert_one_line_error(not_utf8, "the prompt is not valid UTF-8 (at character 2)")
    with open("/dev/full", "w") as full:
        disk_full = subprocess.run(
            [sys.executable, "-m", "cake_py.cli", "run", str(tiny_llama), "hi", "--max-tokens", "4"],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=120, env=environment,
        )  # fmt: skip
    assert disk_full.returncode == 1 and "Traceback" not in disk_full.stderr
    assert "cake: error: cannot write the output: No space left on device" in disk_full.stderr
    reader = subprocess.Popen(
        [sys.executable, "-m", "cake_py.cli", "run", str(tiny_llama), "hi", "--max-tokens", "200", "--raw"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment,
    )  # fmt: skip
    assert reader.stdout is not None and reader.stderr is not None
    reader.stdout.read(1)
    reader.stdout.close()  # as `| head -c 1` does
    assert reader.wait(timeout=120) == 141
    assert b"Traceback" not in reader.stderr.read()
    reader.stderr.close()
    assert_one_line_error(cake("run", str(tiny_llama), "hi", "--max-tokens", "0"), "'0' must be at least 1")


def test_run_with_an_empty_model_is_refused_not_the_embedded_default() -> None:
    assert_one_line_error(cake("run", "", "hi", "--max-tokens", "1"), "MODEL '' names no model")


def test_run_with_a_model_and_no_prompt_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    """`cake run ./model` (ollama's `ollama run MODEL`) sent the path as the prompt to the embedded default."""
    assert_one_line_error(cake("run", str(tiny_llama), "--max-tokens", "1"), "is a model and no prompt")
    gguf = tmp_path / "m.GGUF"
    gguf.write_bytes(b"")
    assert_one_line_error(cake("run", str(gguf), "--max-tokens", "1"), "is a model and no prompt")
    # A mistyped model path was answered as a prompt, slowly and at length.
    missing = str(tmp_path / "no-such-model.gguf")
    assert_one_line_error(cake("run", missing, "--max-tokens", "1"), "looks like a .gguf file, but there is none")


def test_run_takes_a_thread_count_and_a_log_level_in_any_case(tiny_llama: Path) -> None:
    """`cake run` had no --threads (as serve and worker have, and llama.cpp's -t): only OMP_NUM_THREADS bounded it;
    --log-level INFO was refused; --raw ignored --chat-template without a word."""
    ran = cake("run", str(tiny_llama), "hi", "--threads", "1", "--max-tokens", "2", "--dtype", "float32")
    assert ran.returncode == 0, ran.stderr
    assert_one_line_error(cake("run", "hi", "--threads", "0"), "--threads")
    assert_one_line_error(cake("run", "hi", "--raw", "--chat-template", "{{ x }}"), "--raw sends PROMPT without")
    from cake_py.cli_parser import build_parser
    from cake_py.engine.oneshot import run_prompt
    from cake_py.models.sampling import SamplingParams

    before = torch.get_num_threads()
    try:
        params = SamplingParams(temperature=0.0, max_tokens=1)
        run_prompt(str(tiny_llama), "hi", params, lambda _: None, dtype="float32", device="cpu", threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)

    assert build_parser().parse_args(["worker", "--log-level", "INFO"]).log_level == "info"
    assert build_parser().parse_args(["run", "hi", "--threads", "3"]).threads == 3
    assert build_parser().parse_args(["run", "hi", "--seed", "-1"]).seed is None  # random, as llama.cpp's -s -1
    assert build_parser().parse_args(["run", "hi", "--seed", "-2"]).seed == -2


def test_run_reads_the_prompt_from_stdin_when_it_is_a_dash(tiny_llama: Path) -> None:
    """`cat question.txt | cake run MODEL -`: a long or multi-line prompt had to fit in one shell argument."""
    command = [sys.executable, "-m", "cake_py.cli", "run", str(tiny_llama)]
    flags = ["--max-tokens", "4", "--dtype", "float32", "--raw"]
    given = subprocess.run([*command, "hello\nthere", *flags], capture_output=True, text=True, timeout=120)
    piped = subprocess.run([*command, "-", *flags], input="hello\nthere", capture_output=True, text=True, timeout=120)
    assert given.returncode == 0 and piped.returncode == 0, piped.stderr
    assert piped.stdout == given.stdout
    not_utf8 = subprocess.run([*command, "-", *flags], input=b"caf\xe9", capture_output=True, timeout=120)
    assert not_utf8.returncode == 1
    assert not_utf8.stderr.decode() == "cake: error: the prompt on stdin is not valid UTF-8 (at byte 3)\n"
    closed = subprocess.run([*command, "-", *flags], stdin=None, capture_output=True, text=True, timeout=120,
                            preexec_fn=lambda: os.close(0))  # fmt: skip
    assert_one_line_error(closed, "stdin is closed")
