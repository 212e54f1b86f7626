"""The `cake` command: flags → settings → run. No logic lives here."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from cake_py.cli_parser import build_parser
from cake_py.config import (
    ServeSettings,
    WorkerSettings,
    check_device,
    check_dtype,
    default_cache_dir,
    default_files_dir,
    env_given,
    load_cluster_file,
    parse_cpus,
    parse_workers_flag,
)
from cake_py.config_checks import (
    check_admin_key,
    check_cluster_key,
    check_files_dir,
    check_model,
    check_tls_files,
    parse_api_keys,
    parse_origins,
    parse_ui_auth,
    read_chat_template,
    read_prompt,
    run_arguments,
)
from cake_py.errors import CakeError, ConfigError, Stopped, StoppedStarting


def _serve_settings(args: argparse.Namespace) -> ServeSettings:
    model, model_path = check_model(args.model, "MODEL"), check_model(args.model_path, "--model-path")
    if model and model_path and model != model_path:
        raise ConfigError(f"MODEL {model!r} and --model-path {model_path!r} disagree")
    model = model or model_path
    workers = []
    if args.config is not None:
        cluster = load_cluster_file(args.config)
        model = model or cluster.model
        workers = cluster.workers
    if args.workers is not None:  # --workers "$UNSET" is an error to report, not a master serving alone
        if workers:
            raise ConfigError("give workers either with --workers or in --config, not both")
        workers = parse_workers_flag(args.workers)
    cpus = parse_cpus(args.cpus)
    given = _given(args.api_key, "CAKE_API_KEY")  # --api-key "" is an error, not an open server
    api_keys, api_key_names = parse_api_keys(given, args.api_key_file)
    admin_key = check_admin_key(_given(args.admin_key, "CAKE_ADMIN_KEY"))
    if admin_key is not None and api_keys and admin_key not in api_keys:  # the admin's key reaches the rest too
        api_keys, api_key_names = (*api_keys, admin_key), {**api_key_names, admin_key: "admin"}
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
        admin_key=admin_key,
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
        micro_batch_tokens=args.micro_batch_tokens,
        cuda_graphs=args.cuda_graphs,
        keep_free_bytes=_mebibytes(args.keep_free_mb),
        files_dir=check_files_dir(args.files_dir or default_files_dir()),
        max_file_bytes=args.max_file_mb * 1024 * 1024,
        files_max_bytes=args.files_max_gb,
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
        assign_idle_seconds=args.assign_idle_seconds,
        data_port=args.data_port,
        cpus=cpus,
        cuda_graphs=args.cuda_graphs,
        keep_free_bytes=_mebibytes(args.keep_free_mb),
    )


def _mebibytes(value: int | None) -> int | None:
    return None if value is None else value * 1024 * 1024


def _dispatch(args: argparse.Namespace) -> int:
    # Each command checks what it was given before it imports what runs it (torch takes seconds to import): a bad
    # flag or settings file is answered at once.
    if args.command == "serve":
        serve_settings = _serve_settings(args)
        from cake_py.api.server import serve

        serve(serve_settings)
    elif args.command == "worker":
        worker_settings = _worker_settings(args)
        from cake_py.rpc.worker import run_worker

        run_worker(worker_settings)
    elif args.command == "run":
        model, prompt = run_arguments(args.args)
        prompt = read_prompt(prompt, getattr(sys.stdin, "buffer", None))
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as error:  # bytes the shell passed that are not UTF-8 (surrogate escapes)
            raise ConfigError(f"the prompt is not valid UTF-8 (at character {error.start})") from None
        device = check_device(args.device)
        options = {"dtype": args.dtype, "device": device, "raw": args.raw, "cuda_graphs": args.cuda_graphs}
        options["threads"] = args.threads
        options["chat_template"] = read_chat_template(args.chat_template)

        from cake_py.engine.oneshot import run_prompt
        from cake_py.models.sampling import SamplingParams

        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
        )

        def write(text: str) -> None:
            _output(text)

        run_prompt(model, prompt, params, write, speculative_tokens=args.speculative_tokens, **options)
        _output("\n")
    elif args.command == "pull":
        from cake_py.models.hub_gguf import hub_model

        _output(f"{hub_model(args.model)[1]}\n")
    elif args.command == "list":
        from huggingface_hub import constants

        from cake_py.models.hf_cache import list_cached

        models = list_cached()
        for cached in models:
            _output(f"{cached.model_id}\t{cached.size_bytes / 1e6:.1f} MB\t{cached.path}\n")
        if not models:  # said on stderr: stdout stays a list (empty) for scripts
            print(f"no models in the HF cache ({constants.HF_HUB_CACHE}); cake pull MODEL adds one", file=sys.stderr)
    elif args.command == "rm":
        from cake_py.models.hf_cache import remove_cached

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


def _usable_streams() -> None:
    """stdout or stderr closed at start (`>&-`) is the null device, as for a daemon: Python leaves it None, and the
    first print or log config fails. Output that the terminal's encoding cannot hold is replaced, not a traceback."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115 - for the process's life
        elif hasattr(stream, "reconfigure"):
            with contextlib.suppress(ValueError, OSError):
                stream.reconfigure(errors="replace")


# A server stopped on a signal: Ctrl-C is 130 (128 + SIGINT), as the shell reports an interrupted command, so a script
# sees it was interrupted; SIGTERM is how a service manager asks for a stop (docker stop, systemctl stop, Kubernetes),
# and a stop done as asked is a success, 0, as nginx, gunicorn and PostgreSQL end on it.
STOPPED_EXIT_CODES: dict[int, int] = {signal.SIGINT: 130, signal.SIGTERM: 0}


def _exit_now(code: int) -> int:
    """`code`, as main's result; with other threads still running (a download's pool, a server's handlers, a weight
    stream), exit at once instead: even daemon threads are joined at exit, a download's file by file, and one still
    in torch or gRPC's native code when the interpreter exits aborts the process."""
    if any(thread is not threading.main_thread() and thread.is_alive() for thread in threading.enumerate()):
        with contextlib.suppress(OSError):
            sys.stdout.flush()
            sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    return code


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM end a server's startup as they end its serving. Python raises KeyboardInterrupt only where
    SIGINT was not ignored at launch, and a non-interactive shell starts background jobs (`( cake serve … & )`) with
    it ignored: a startup (a download, the workers' handshakes) went on through Ctrl-C, though the serving after it
    stops on one. SIGTERM's default killed the process without a word (exit 143), where a stop while serving says so
    and exits 0: `docker stop` during a long placement is such a stop. The server's own handlers replace these."""
    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _stop_starting)


def _stop_starting(signum: int, _frame: object) -> None:
    raise StoppedStarting(signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _usable_streams()
    logging.basicConfig(
        level=getattr(args, "log_level", "warning").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # A log line that cannot be written (stderr on a full disk) is dropped, not replaced by a traceback about it.
    logging.raiseExceptions = False
    try:
        if args.command in ("serve", "worker"):
            _stop_on_signals()
        return _dispatch(args)
    except CakeError as error:
        print(f"cake: error: {error}", file=sys.stderr)
        # A startup that failed may leave threads in torch or gRPC (another worker's weight stream, loaded a layer at
        # a time on gRPC's thread): the interpreter's exit ran C++ destructors under them, and the process aborted
        # after this line ("terminate called without an active exception", SIGABRT).
        return _exit_now(1)
    except (Stopped, StoppedStarting) as stopped:  # serve or worker, stopped on a signal, serving or starting
        print(f"cake {args.command}: stopped ({stopped})", file=sys.stderr)
        return _exit_now(STOPPED_EXIT_CODES[stopped.signum])
    except KeyboardInterrupt as interrupt:  # Ctrl-C: one line (what it stopped, when that says), no traceback
        print(f"cake: interrupted: {interrupt}" if str(interrupt) else "cake: interrupted", file=sys.stderr)
        return _exit_now(130)
    except BrokenPipeError:  # `cake run … | head`: the reader has what it wanted
        with contextlib.suppress(OSError):  # and Python's own flush at exit must not complain either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
