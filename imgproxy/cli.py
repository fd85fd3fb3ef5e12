"""`imgproxy serve` and `imgproxy check-config`."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import hashlib
import logging
import os
import secrets
import sys


from . import __version__
from . import listener, logs, serving, workers
from .config import ConfigError
from .gateway import Gateway
from .runtime import Runtime
from .server import create_app


SHUTDOWN_WARNING_DAYS = 30  # models shutting down within this many days are named at start-up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imgproxy", description="OpenAI Images API gateway.")
    parser.add_argument("--version", action="version", version=f"imgproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    default_config = os.environ.get("IMGPROXY_CONFIG", "proxy.yaml")
    serve = commands.add_parser(
        "serve", help="run the gateway",
        description="Serve the OpenAI Images API on the configured address, reloading the config file when it changes.",
    )
    serve.add_argument("--config", default=default_config, help="config file (IMGPROXY_CONFIG; default ./proxy.yaml)")
    serve.add_argument("--host", default=os.environ.get("IMGPROXY_HOST"), help="listen address (IMGPROXY_HOST; default from the config, else 127.0.0.1)")
    serve.add_argument("--port", type=int, default=_env_int("IMGPROXY_PORT"), help="listen port (IMGPROXY_PORT; default from the config, else 8080)")
    serve.add_argument("--log-level", default=os.environ.get("IMGPROXY_LOG_LEVEL"), choices=["debug", "info", "warning", "error"], help="IMGPROXY_LOG_LEVEL; default from the config, else info")
    serve.add_argument(
        "--workers", default=os.environ.get("IMGPROXY_WORKERS", "1"),
        help="server processes on the one port, each with its own event loop (IMGPROXY_WORKERS; a number or `auto` for one per CPU; default 1)",
    )
    serve.add_argument(workers.WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)  # set by the supervisor for its workers

    check = commands.add_parser(
        "check-config", help="validate a config file and print its model table",
        description="Validate a config file as `serve` would load it (without starting anything) and print its "
        "models, their providers and whether each provider's key is set. Exit status 1 if it is invalid.",
    )
    check.add_argument("file", nargs="?", default=default_config, help="config file (IMGPROXY_CONFIG; default ./proxy.yaml)")

    hash_key = commands.add_parser(
        "hash-key", help="make a new random client key and print it with its SHA-256",
        description="Print a new random client key and its SHA-256 (for auth.keys[].sha256), or with --stdin "
        "the SHA-256 of a key you already have.",
    )
    hash_key.add_argument("--stdin", action="store_true", help="hash a key read from standard input instead")

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return serve_command(args)
        if args.command == "hash-key":
            code = hash_key_command(args.stdin)
        else:
            code = check_config_command(args.file)
        sys.stdout.flush()  # here, so a closed pipe is seen below and not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader went away (`imgproxy check-config | head -1`): stop quietly, as the
        # Python docs advise, with stdout pointed at /dev/null so the exit flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def hash_key_command(from_stdin: bool) -> int:
    key = sys.stdin.readline().strip() if from_stdin else "sk-imgproxy-" + secrets.token_urlsafe(24)
    if not key:
        print("imgproxy: no key on standard input", file=sys.stderr)
        return 1
    if not from_stdin:
        print(f"key:    {key}")
    print(f"sha256: {hashlib.sha256(key.encode()).hexdigest()}")
    return 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        sys.exit(f"imgproxy: {name} must be a port number, not {value!r}")


def serve_command(args) -> int:
    logs.setup(args.log_level or "info", "json")
    try:
        count = workers.worker_count(args.workers)
    except ValueError:
        print(f"imgproxy: --workers takes a number of at least 1 or `auto`, not {args.workers!r}", file=sys.stderr)
        return 2
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        gateway = loop.run_until_complete(Gateway.load(args.config))
    except ConfigError as exc:
        print(f"imgproxy: invalid config: {exc}", file=sys.stderr)
        return 2
    config = gateway.config
    logs.setup(args.log_level or config.logging.level, config.logging.format)
    if count > 1:
        loop.close()
        problem = workers.refusal(config, args.config)
        if problem:
            print(f"imgproxy: {problem}", file=sys.stderr)
            return 2
        return workers.Supervisor(count, _worker_args(args)).run()
    warn_about_start_up(gateway)
    server = config.server
    host = args.host or server.host
    port = args.port if args.port is not None else server.port
    runtime = Runtime(gateway, args.config, server.reload_interval, freeze_heap=True)
    # Requests free what they allocate by reference counting (tests/test_memory.py keeps it
    # so); the collector runs when live objects grow by the threshold, and at Python's 700
    # the objects of 64 requests in flight set it off every ~12 requests for nothing to find
    # (~30 us per request). 10,000 is passed only when thousands of requests are in flight.
    gc.set_threshold(10_000, 10, 10)
    # The listener caps connections and header time (docs/security.md); serve drains
    # within server.drain_timeout on SIGTERM (docs/operations.md).
    app = create_app(runtime, reuse_port=args.reuse_port)
    runner = listener.api_runner(app, server, gateway.shared.metrics, shutdown_timeout=serving.CANCEL_GRACE)
    try:
        loop.run_until_complete(
            serving.serve(runner, runtime, host, port, backlog=server.backlog, reuse_port=args.reuse_port, ready=announce_serving(len(config.models)))
        )
    except serving.ListenFailed as exc:
        return listen_failed(exc.error, exc.host, exc.port)
    except OSError as exc:  # not a port: a file or folder a plugin or the store could not open
        print(f"imgproxy: cannot start: {exc}", file=sys.stderr)
        return 2
    finally:
        serving.close_loop(loop)
    return 0


def announce_serving(models: int):
    """The line that says the gateway serves: called only once the listening socket is
    bound, so a port in use never gets a success line first."""

    def announce(host: str, port: int) -> None:
        logging.getLogger("imgproxy").info("imgproxy %s serving %d models on http://%s:%s", __version__, models, host, port)

    return announce


def listen_failed(exc: OSError, host: str, port: int) -> int:
    """One line instead of a traceback for the usual reasons a listening socket cannot be had."""
    reasons = {
        errno.EADDRINUSE: "the address is already in use (another imgproxy, or another server, listens there)",
        errno.EACCES: "permission denied (ports below 1024 need privileges)",
        errno.EADDRNOTAVAIL: "the address is not one of this machine's",
    }
    reason = reasons.get(exc.errno, exc.strerror or str(exc))
    print(f"imgproxy: cannot listen on {host}:{port}: {reason}", file=sys.stderr)
    return 2


def missing_keys(gateway: Gateway) -> dict[str, str]:
    """Providers that need a key and have none: name -> what to set."""
    missing = {}
    for name, spec in gateway.config.providers.items():
        if gateway.providers[name].needs_key and not spec.api_key:
            missing[name] = " or ".join(spec.api_key_vars) or f"providers.{name}.api_key"
    return missing


def warn_about_start_up(gateway: Gateway) -> None:
    """What an operator should know before the first request finds out for them."""
    log = logging.getLogger("imgproxy")
    config = gateway.config
    for name, setting in missing_keys(gateway).items():
        models = sorted(m.name for m in config.models.values() if m.provider == name)
        log.warning(
            "provider %s has no API key: set %s; until then its models (%s) answer 503 provider_not_configured",
            name, setting, ", ".join(models) or "none",
        )
    today = gateway.routing.today()
    for model in config.models.values():
        if model.shutdown is None or (model.shutdown - today).days > SHUTDOWN_WARNING_DAYS:
            continue
        instead = f"; use {model.replacement!r} instead" if model.replacement else ""
        if model.retired(today):
            log.warning("model %s was shut down on %s: its requests answer 404 model_retired%s", model.name, model.shutdown, instead)
        else:
            log.warning("model %s shuts down on %s (in %d days): from then on its requests answer 404 model_retired%s",
                        model.name, model.shutdown, (model.shutdown - today).days, instead)
    # A shared store refuses an unset key when the config loads; presigned S3 URLs do not use it.
    if not config.images.signing_key and config.images.store == "filesystem":
        log.warning(
            "images.signing_key is not set (IMGPROXY_SIGNING_KEY in the shipped proxy.yaml): image URLs are signed "
            "with a random key of this process, so they break on restart and on other replicas"
        )


def _worker_args(args) -> list[str]:
    """The serve options a worker needs: the supervisor's, resolved once."""
    out = ["--config", args.config]
    for flag, value in (("--host", args.host), ("--port", args.port), ("--log-level", args.log_level)):
        if value is not None:
            out += [flag, str(value)]
    return out


def check_config_command(path: str) -> int:
    try:
        gateway = asyncio.run(Gateway.load(path))
    except ConfigError as exc:
        print(f"imgproxy: invalid config: {exc}", file=sys.stderr)
        return 1
    warn_about_start_up(gateway)
    rows = [("MODEL", "ALIASES", "PROVIDER", "UPSTREAM MODEL", "KEY")]
    missing = missing_keys(gateway)
    for name, aliases, provider, upstream in gateway.routing.rows():
        provider_name = gateway.config.models[name].provider
        adapter = gateway.providers[provider_name]
        key = "not needed" if not adapter.needs_key else ("MISSING: " + missing[provider_name] if provider_name in missing else "set")
        rows.append((name, aliases or "-", provider, upstream, key))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"{path}: valid, {len(gateway.config.models)} models")
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
