"""The `cake` command's flags: one argparse parser with a subcommand per role (serve, worker, run and the HF cache
commands). Values are checked as they are parsed (cli_values.py); turning them into settings is cli.py's."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cake_py import __version__
from cake_py.cli_values import (
    at_least_one,
    data_port,
    display_name,
    folder,
    gigabytes,
    host,
    port,
    positive_int,
    seconds_or_off,
    seed,
    thread_count,
    timeout_seconds,
)
from cake_py.config import (
    DEFAULT_SERVE_PORT,
    DEFAULT_WORKER_PORT,
    DTYPES,
    POOLING_KINDS,
    default_cache_dir,
    default_files_dir,
)
from cake_py.errors import ConfigError


class _HelpFormatter(argparse.HelpFormatter):
    """Help that names each value flag's default (`--port` 8080, `run --temperature` 0.0), as the README's synopsis
    does, unless its text already says it; `--help` showed none of them."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.option_strings and action.nargs != 0 and action.default not in (None, argparse.SUPPRESS):
            if "default" not in text:
                text = f"{text} (default: %(default)s)".strip()
        return text


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (plus usage) and exits 2, never a traceback."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]
CPUS_HELP = "run on these CPUs only, e.g. 0-3,6, as SCHED_BATCH (default threads: their count)"
DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N (one GPU of several) or mps"
DTYPE_HELP = "dtype the model computes in"
LOG_HELP = "least severe log lines written to stderr"


def _default_folder(default: Callable[[], Path]) -> str:
    """A default folder for --help: without a home folder, the reason (the command fails on it only if it needs it)."""
    try:
        return str(default())
    except ConfigError as error:
        return f"none, {error}"


def _graphs_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="on a GPU, run every decode step eagerly instead of replaying one sequence's steps as CUDA graphs",
    )


def _memory_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keep-free-mb",
        type=positive_int,
        help="host memory in MiB that KV caches never take: a sequence that would grow into it waits or ends with "
        "an error instead of the process being killed (default: 1024 or 5%% of RAM, whichever is more; 0: none)",
    )


def _tls_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate of this node (enables TLS)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of this node")
    parser.add_argument("--tls-ca", type=Path, help="PEM CA bundle used to verify the other side")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cake", description="Distributed inference cluster for transformer models.")
    parser.add_argument("--version", action="version", version=f"cake_py {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    serve = commands.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible API + web UI)")
    serve.add_argument(
        "model",
        nargs="?",
        help="HF repo id (org/name; org/name:Q4_K_M picks a GGUF repo's quantization, as llama.cpp's -hf), local HF "
        "folder or .gguf file (default: embedded)",
    )
    serve.add_argument("--model-path", dest="model_path", help="alias of MODEL")
    serve.add_argument("--config", type=Path, help="cluster.yaml with the model and workers")
    serve.add_argument("--workers", help="comma-separated HOST:PORT of workers (automatic placement)")
    serve.add_argument("--host", type=host, default="127.0.0.1", help="address the HTTP API listens on")
    serve.add_argument("--port", type=port, default=DEFAULT_SERVE_PORT, help="port of the HTTP API")
    serve.add_argument("--model-name", type=display_name, help="model id reported by the API (default: the model's id)")
    serve.add_argument("--dtype", default="bfloat16", choices=DTYPES, help=DTYPE_HELP)
    serve.add_argument("--device", default="auto", help=DEVICE_HELP)
    serve.add_argument(
        "--api-key",
        help="require this Bearer key on the API, or any of KEY1,KEY2,… (also CAKE_API_KEY); with several, each key's "
        "files, batches and stored answers are its own",
    )
    serve.add_argument("--api-key-file", type=Path, help="API keys, one per line (# comments); adds to --api-key")
    serve.add_argument(
        "--admin-key",
        help="the key /models/load and /models/unload need (also CAKE_ADMIN_KEY); without it, the one --api-key "
        "may, and with several keys none may",
    )
    serve.add_argument("--ui-auth", help="USER:PASS for HTTP Basic auth on the web UI and topology")
    serve.add_argument(
        "--allowed-origins",
        help="comma-separated origins whose browser pages may call the API (CORS); * = any, '' = none "
        "(default: any when --api-key is set, else none: a page could otherwise use an open server)",
    )
    serve.add_argument("--cluster-key", help="shared secret between master and workers (also CAKE_CLUSTER_KEY)")
    serve.add_argument(
        "--connect-timeout", type=timeout_seconds, default=10.0, help="seconds to wait for each worker at startup"
    )
    serve.add_argument("--threads", type=thread_count, help="torch threads of the master")
    serve.add_argument(
        "--failover-after",
        type=seconds_or_off,
        default=0.0,
        metavar="SECONDS",
        help="place the model again without a worker down this long, and with it once it is back (0: off)",
    )
    serve.add_argument(
        "--files-dir",
        type=folder,
        help=f"Files and Batch APIs' storage (default: {_default_folder(default_files_dir)})",
    )
    serve.add_argument(
        "--max-file-mb", type=at_least_one, default=512, help="largest file the Files API accepts, in MiB"
    )
    serve.add_argument(
        "--files-max-gb",
        type=gigabytes,
        default=0,
        help="most the Files API keeps for each API key (one key or none: for everyone), in GB (0: no limit)",
    )
    serve.add_argument(
        "--batch-concurrency",
        type=at_least_one,
        help="requests of one batch running at once (default: half of --max-running)",
    )
    serve.add_argument("--cpus", help=CPUS_HELP)
    serve.add_argument(
        "--no-chain",
        dest="chain",
        action="store_false",
        help="send hidden states back through the master after every worker instead of worker to worker",
    )
    serve.add_argument(
        "--micro-batch-tokens",
        type=positive_int,
        help="cut a step of at least twice this many tokens into pieces the workers compute at once, each on the "
        "piece before the next worker's (a long prompt's prefill); 0 = off (default: 128 where the workers are on "
        "other hosts or GPUs, off where they share one host's CPUs)",
    )
    serve.add_argument("--rate-limit", type=positive_int, default=60, help="requests/min per client; 0 = off")
    serve.add_argument("--rate-burst", type=at_least_one, default=10, help="requests a client may send at once")
    serve.add_argument(
        "--max-body-bytes", type=positive_int, default=8 * 1024 * 1024, help="largest request body; 0 = no limit"
    )
    serve.add_argument("--max-running", type=at_least_one, default=16, help="sequences decoded together per step")
    serve.add_argument(
        "--max-queue", type=at_least_one, default=1024, help="sequences waiting to start; more get a 503"
    )
    serve.add_argument(
        "--max-batch-tokens",
        type=at_least_one,
        default=512,
        help="tokens per step: a long prompt's prefill runs in chunks of this size beside the running streams",
    )
    serve.add_argument(
        "--prefix-cache-tokens",
        type=positive_int,
        default=8192,
        help="keep finished sequences' KV caches (up to this many tokens in all) for prompts that start with the "
        "same tokens, e.g. the next turn of a chat; 0 turns it off",
    )
    serve.add_argument(
        "--speculative-tokens",
        type=positive_int,
        default=0,
        help="prompt lookup decoding: up to this many draft tokens per decode step, taken from where the text's last "
        "words appeared before and kept while the model agrees (same output, fewer steps); 0 turns it off",
    )
    serve.add_argument(
        "--pooling",
        choices=POOLING_KINDS,
        default=None,
        help="how /v1/embeddings pools a prompt's final hidden states: its last token or the mean of all of them "
        "(default: what the model folder's sentence-transformers config says, else last)",
    )
    serve.add_argument(
        "--chat-template",
        metavar="TEMPLATE",
        help="a Jinja chat template (a file, or the template itself) to use instead of the model's own",
    )
    serve.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="let a chat request's chat_template field replace the model's template for that request (a template "
        "runs on the server: only for clients you trust)",
    )
    serve.add_argument(
        "--max-model-len",
        "--ctx-size",
        dest="max_model_len",
        type=at_least_one,
        metavar="TOKENS",
        help="the most tokens a sequence may hold, prompt and answer (default: the model's context)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=LOG_LEVELS,
        help=LOG_HELP,  # INFO as info
    )
    _graphs_flag(serve)
    _memory_flag(serve)
    _tls_flags(serve)

    worker = commands.add_parser("worker", help="run a worker that holds a range of layers for a master")
    worker.add_argument("--host", type=host, default="0.0.0.0", help="address the gRPC port listens on")
    worker.add_argument("--port", type=port, default=DEFAULT_WORKER_PORT, help="gRPC port the master dials")
    worker.add_argument("--name", type=display_name, help="worker name shown in the topology (default: hostname:port)")
    worker.add_argument("--cluster-key", help="shared secret between master and workers (also CAKE_CLUSTER_KEY)")
    worker.add_argument(
        "--cache-dir", type=folder, help=f"weight cache (default: {_default_folder(default_cache_dir)})"
    )
    worker.add_argument(
        "--cache-max-gb",
        type=gigabytes,
        default=0,
        help="largest size of the weight cache: weights unused the longest are deleted to make room (0: no limit)",
    )
    worker.add_argument("--device", default="auto", help=DEVICE_HELP)
    _graphs_flag(worker)
    _memory_flag(worker)
    worker.add_argument("--threads", type=thread_count, help="torch threads of this worker")
    worker.add_argument("--cpus", help=CPUS_HELP)
    worker.add_argument(
        "--data-port",
        type=data_port,
        default=0,
        help="TCP port of the forward fast path (0: any free port, announced to the master; -1: off, gRPC only)",
    )
    worker.add_argument(
        "--kv-idle-seconds",
        type=at_least_one,
        default=600,
        help="free a sequence's KV caches after this many seconds idle",
    )
    worker.add_argument(
        "--assign-idle-seconds",
        type=at_least_one,
        default=60,
        help="give up a master's layer assignment whose weight stream sends nothing this long (a master frozen or "
        "gone mid-stream), so that other masters can assign this worker",
    )
    worker.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=LOG_LEVELS,
        help=LOG_HELP,  # INFO as info
    )
    _tls_flags(worker)

    run = commands.add_parser(
        "run",
        help="generate one answer locally and stream it to stdout",
        usage="cake run [-h] [options] [MODEL] PROMPT",  # argparse would print "[MODEL] PROMPT [[MODEL] PROMPT ...]"
    )
    run.add_argument("args", nargs="+", metavar="[MODEL] PROMPT")
    run.add_argument("--max-tokens", type=at_least_one, default=512, help="most tokens of the answer")
    run.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    run.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's probability mass")
    run.add_argument("--seed", type=seed, help="sampling seed (default, or -1: random)")
    run.add_argument("--dtype", default="bfloat16", choices=DTYPES, help=DTYPE_HELP)
    run.add_argument("--device", default="auto", help=DEVICE_HELP)
    run.add_argument("--threads", type=thread_count, help="torch threads (default: torch's, one per core)")
    _graphs_flag(run)
    run.add_argument("--raw", action="store_true", help="send PROMPT as is, without the chat template")
    run.add_argument("--chat-template", metavar="TEMPLATE", help="a Jinja chat template (a file, or the template)")
    run.add_argument(
        "--speculative-tokens", type=positive_int, default=0, help="prompt lookup decoding's drafts per step (0: off)"
    )

    pull = commands.add_parser("pull", help="download a model from the Hugging Face Hub into the HF cache")
    pull.add_argument("model", help="HF repo id: org/name, or org/name:QUANT for only that GGUF quantization")
    commands.add_parser("list", help="list models in the HF cache")
    remove = commands.add_parser("rm", help="delete a model from the HF cache")
    remove.add_argument("model")
    return parser
