"""The `cake` command: flags → settings → run. No logic lives here."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cake_py import __version__
from cake_py.cli_values import (
    at_least_one,
    data_port,
    gigabytes,
    port,
    positive_int,
    seconds_or_off,
    thread_count,
    timeout_seconds,
)
from cake_py.config import (
    DEFAULT_SERVE_PORT,
    DEFAULT_WORKER_PORT,
    DTYPES,
    POOLING_KINDS,
    ServeSettings,
    WorkerSettings,
    check_cluster_key,
    check_device,
    check_dtype,
    check_files_dir,
    check_tls_files,
    default_cache_dir,
    default_files_dir,
    env_given,
    load_cluster_file,
    parse_api_keys,
    parse_cpus,
    parse_origins,
    parse_ui_auth,
    parse_workers_flag,
    read_chat_template,
)
from cake_py.errors import CakeError, ConfigError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (plus usage) and exits 2, never a traceback."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


CPUS_HELP = "run on these CPUs only, e.g. 0-3,6, as SCHED_BATCH (default threads: their count)"
DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N (one GPU of several) or mps"


def _graphs_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="on a GPU, run every decode step eagerly instead of replaying one sequence's steps as CUDA graphs",
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
    serve.add_argument("model", nargs="?", help="HF repo id, local HF folder or .gguf file (default: embedded)")
    serve.add_argument("--model-path", dest="model_path", help="alias of MODEL")
    serve.add_argument("--config", type=Path, help="cluster.yaml with the model and workers")
    serve.add_argument("--workers", help="comma-separated HOST:PORT of workers (automatic placement)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=port, default=DEFAULT_SERVE_PORT)
    serve.add_argument("--model-name", help="model id reported by the API (default: the model's id)")
    serve.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    serve.add_argument("--device", default="auto", help=DEVICE_HELP)
    serve.add_argument(
        "--api-key",
        help="require this Bearer key on the API, or any of KEY1,KEY2,… (also CAKE_API_KEY); with several, each key's "
        "files, batches and stored answers are its own",
    )
    serve.add_argument("--api-key-file", type=Path, help="API keys, one per line (# comments); adds to --api-key")
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
    serve.add_argument("--files-dir", type=Path, help=f"Files and Batch APIs' storage (default: {default_files_dir()})")
    serve.add_argument(
        "--max-file-mb", type=at_least_one, default=512, help="largest file the Files API accepts, in MiB"
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
    serve.add_argument("--rate-limit", type=positive_int, default=60, help="requests/min per client; 0 = off")
    serve.add_argument("--rate-burst", type=positive_int, default=10, help="requests a client may send at once")
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
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _graphs_flag(serve)
    _tls_flags(serve)

    worker = commands.add_parser("worker", help="run a worker that holds a range of layers for a master")
    worker.add_argument("--host", default="0.0.0.0")
    worker.add_argument("--port", type=port, default=DEFAULT_WORKER_PORT)
    worker.add_argument("--name", help="worker name shown in the topology (default: hostname:port)")
    worker.add_argument("--cluster-key", help="shared secret between master and workers (also CAKE_CLUSTER_KEY)")
    worker.add_argument("--cache-dir", type=Path, help=f"weight cache (default: {default_cache_dir()})")
    worker.add_argument(
        "--cache-max-gb",
        type=gigabytes,
        default=0,
        help="largest size of the weight cache: weights unused the longest are deleted to make room (0: no limit)",
    )
    worker.add_argument("--device", default="auto", help=DEVICE_HELP)
    _graphs_flag(worker)
    worker.add_argument("--threads", type=thread_count, help="torch threads of this worker")
    worker.add_argument("--cpus", help=CPUS_HELP)
    worker.add_argument(
        "--data-port",
        type=data_port,
        default=0,
        help="TCP port of the forward fast path (0: any free port, announced to the master; -1: off, gRPC only)",
    )
    worker.add_argument(
        "--kv-idle-seconds", type=positive_int, default=600, help="free a sequence's KV caches after this idle time"
    )
    worker.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _tls_flags(worker)

    run = commands.add_parser(
        "run",
        help="generate one answer locally and stream it to stdout",
        usage="cake run [-h] [options] [MODEL] PROMPT",  # argparse would print "[MODEL] PROMPT [[MODEL] PROMPT ...]"
    )
    run.add_argument("args", nargs="+", metavar="[MODEL] PROMPT")
    run.add_argument("--max-tokens", type=at_least_one, default=512)
    run.add_argument("--temperature", type=float, default=0.0)
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--seed", type=int)
    run.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    run.add_argument("--device", default="auto", help=DEVICE_HELP)
    _graphs_flag(run)
    run.add_argument("--raw", action="store_true", help="send PROMPT as is, without the chat template")
    run.add_argument("--chat-template", metavar="TEMPLATE", help="a Jinja chat template (a file, or the template)")
    run.add_argument(
        "--speculative-tokens", type=positive_int, default=0, help="prompt lookup decoding's drafts per step (0: off)"
    )

    pull = commands.add_parser("pull", help="download a model from the Hugging Face Hub into the HF cache")
    pull.add_argument("model")
    commands.add_parser("list", help="list models in the HF cache")
    remove = commands.add_parser("rm", help="delete a model from the HF cache")
    remove.add_argument("model")
    return parser


def _serve_settings(args: argparse.Namespace) -> ServeSettings:
    if args.model and args.model_path and args.model != args.model_path:
        raise ConfigError(f"MODEL {args.model!r} and --model-path {args.model_path!r} disagree")
    model = args.model or args.model_path
    workers = []
    if args.config is not None:
        cluster = load_cluster_file(args.config)
        model = model or cluster.model
        workers = cluster.workers
    if args.workers:
        if workers:
            raise ConfigError("give workers either with --workers or in --config, not both")
        workers = parse_workers_flag(args.workers)
    cpus = parse_cpus(args.cpus)
    given = _given(args.api_key, "CAKE_API_KEY")  # --api-key "" is an error, not an open server
    api_keys, api_key_names = parse_api_keys(given, args.api_key_file)
    return ServeSettings(
        model=model,
        config_path=args.config,
        workers=workers,
        host=args.host,
        port=args.port,
        model_name=args.model_name,
        dtype=check_dtype(args.dtype),
        device=check_device(args.device),
        api_keys=api_keys,
        api_key_names=api_key_names,
        ui_auth=parse_ui_auth(args.ui_auth),
        cluster_key=check_cluster_key(_given(args.cluster_key, "CAKE_CLUSTER_KEY")),
        log_level=args.log_level,
        threads=_threads(args.threads, cpus),
        rate_limit=args.rate_limit,
        allowed_origins=parse_origins(args.allowed_origins) if args.allowed_origins is not None else None,
        rate_burst=args.rate_burst,
        max_body_bytes=args.max_body_bytes,
        max_running=args.max_running,
        max_queued=args.max_queue,
        max_batch_tokens=args.max_batch_tokens,
        prefix_cache_tokens=args.prefix_cache_tokens,
        pooling=args.pooling,
        speculative_tokens=args.speculative_tokens,
        tls_cert=_tls(args),
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        connect_timeout=args.connect_timeout,
        cpus=cpus,
        chain=args.chain,
        cuda_graphs=args.cuda_graphs,
        files_dir=check_files_dir(args.files_dir or default_files_dir()),
        max_file_bytes=args.max_file_mb * 1024 * 1024,
        batch_concurrency=args.batch_concurrency,
        failover_after=args.failover_after,
        chat_template=read_chat_template(args.chat_template),
        max_model_len=args.max_model_len,
        trust_request_chat_template=args.trust_request_chat_template,
    )


def _given(flag: str | None, variable: str) -> str | None:
    """A flag, else its environment variable: a flag given empty (`--cluster-key "$UNSET"`) is an error to report,
    not the same as no flag."""
    return flag if flag is not None else env_given(variable)


def _tls(args: argparse.Namespace) -> Path | None:
    """--tls-cert, once the three TLS flags are checked together."""
    check_tls_files(args.tls_cert, args.tls_key, args.tls_ca)
    tls_cert: Path | None = args.tls_cert
    return tls_cert


def _threads(threads: int | None, cpus: tuple[int, ...] | None) -> int | None:
    """--threads as given, else one per CPU of --cpus, else torch's default."""
    return threads if threads is not None else (len(cpus) if cpus else None)


def _worker_settings(args: argparse.Namespace) -> WorkerSettings:
    cpus = parse_cpus(args.cpus)
    return WorkerSettings(
        host=args.host,
        port=args.port,
        name=args.name,
        cluster_key=check_cluster_key(_given(args.cluster_key, "CAKE_CLUSTER_KEY")),
        cache_dir=args.cache_dir or default_cache_dir(),
        cache_max_bytes=args.cache_max_gb,
        device=check_device(args.device),
        threads=_threads(args.threads, cpus),
        log_level=args.log_level,
        tls_cert=_tls(args),
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        kv_idle_seconds=max(args.kv_idle_seconds, 1),
        data_port=args.data_port,
        cpus=cpus,
        cuda_graphs=args.cuda_graphs,
    )


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from cake_py.api.server import serve

        serve(_serve_settings(args))
    elif args.command == "worker":
        from cake_py.rpc.worker import run_worker

        run_worker(_worker_settings(args))
    elif args.command == "run":
        from cake_py.engine.oneshot import run_prompt
        from cake_py.models.sampling import SamplingParams

        if len(args.args) > 2:
            raise ConfigError(f"cake run takes [MODEL] PROMPT, got {len(args.args)} arguments (quote the prompt)")
        model, prompt = (None, args.args[0]) if len(args.args) == 1 else args.args
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
        )

        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as error:  # bytes the shell passed that are not UTF-8 (surrogate escapes)
            raise ConfigError(f"the prompt is not valid UTF-8 (at character {error.start})") from None

        def write(text: str) -> None:
            _output(text)

        device = check_device(args.device)
        options = {"dtype": args.dtype, "device": device, "raw": args.raw, "cuda_graphs": args.cuda_graphs}
        options["chat_template"] = read_chat_template(args.chat_template)
        run_prompt(model, prompt, params, write, speculative_tokens=args.speculative_tokens, **options)
        _output("\n")
    elif args.command == "pull":
        from cake_py.models.hub import download

        _output(f"{download(args.model)}\n")
    elif args.command == "list":
        from cake_py.models.hub import list_cached

        for model in list_cached():
            _output(f"{model.repo_id}\t{model.size_bytes / 1e6:.1f} MB\t{model.path}\n")
    elif args.command == "rm":
        from cake_py.models.hub import remove_cached

        freed = remove_cached(args.model)
        _output(f"removed {args.model} ({freed / 1e6:.1f} MB freed)\n")
    return 0


def _output(text: str) -> None:
    """Write to stdout now; a closed stdout or a full disk is one line (a closed pipe is main's to end quietly)."""
    if sys.stdout is None:
        raise ConfigError("there is no standard output to write to")
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as error:
        raise ConfigError(f"cannot write the output: {error.strerror or error}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=getattr(args, "log_level", "warning").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return _dispatch(args)
    except CakeError as error:
        print(f"cake: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `cake run … | head`: the reader has what it wanted
        with contextlib.suppress(OSError):  # and Python's own flush at exit must not complain either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
