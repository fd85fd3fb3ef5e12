"""`imgproxy serve` and `imgproxy check-config`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import logging
import os
import secrets
import sys

from . import __version__
from . import logs
from .config import ConfigError
from .gateway import Gateway
from .runtime import Runtime
from . import serving, workers
from .server import create_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imgproxy", description="OpenAI Images API gateway.")
    parser.add_argument("--version", action="version", version=f"imgproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default=os.environ.get("IMGPROXY_CONFIG", "proxy.yaml"), help="config file (IMGPROXY_CONFIG; default ./proxy.yaml)")
    serve.add_argument("--host", default=os.environ.get("IMGPROXY_HOST"), help="listen address (IMGPROXY_HOST; default from the config, else 127.0.0.1)")
    serve.add_argument("--port", type=int, default=_env_int("IMGPROXY_PORT"), help="listen port (IMGPROXY_PORT; default from the config, else 8080)")
    serve.add_argument("--log-level", default=os.environ.get("IMGPROXY_LOG_LEVEL"), choices=["debug", "info", "warning", "error"], help="IMGPROXY_LOG_LEVEL; default from the config, else info")
    serve.add_argument(
        "--workers", default=os.environ.get("IMGPROXY_WORKERS", "1"),
        help="server processes on the one port, each with its own event loop (IMGPROXY_WORKERS; a number or `auto` for one per CPU; default 1)",
    )
    serve.add_argument(workers.WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)  # set by the supervisor for its workers

    check = commands.add_parser("check-config", help="validate a config file and print its model table")
    check.add_argument("file")

    hash_key = commands.add_parser("hash-key", help="make a new random client key and print it with its SHA-256")
    hash_key.add_argument("--stdin", action="store_true", help="hash a key read from standard input instead")

    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve_command(args)
    if args.command == "hash-key":
        return hash_key_command(args.stdin)
    return check_config_command(args.file)


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
    if count > 1:
        problem = workers.refusal(config, args.config)
        if problem:
            print(f"imgproxy: {problem}", file=sys.stderr)
            return 2
        loop.close()
        logs.setup(args.log_level or config.logging.level, config.logging.format)
        return workers.Supervisor(count, _worker_args(args)).run()
    logs.setup(args.log_level or config.logging.level, config.logging.format)
    server = config.server
    host = args.host or server.host
    port = args.port if args.port is not None else server.port
    runtime = Runtime(gateway, args.config, server.reload_interval, freeze_heap=True)
    # Requests free what they allocate by reference counting (tests/test_memory.py keeps it
    # so); the collector runs when live objects grow by the threshold, and at Python's 700
    # the objects of 64 requests in flight set it off every ~12 requests for nothing to find
    # (~30 us per request). 10,000 is passed only when thousands of requests are in flight.
    gc.set_threshold(10_000, 10, 10)
    app = create_app(runtime, reuse_port=args.reuse_port)

    def announce(bound_host: str, bound_port: int) -> None:
        logging.getLogger("imgproxy").info(
            "imgproxy %s serving %d models on http://%s:%s", __version__, len(config.models), bound_host, bound_port
        )

    try:
        loop.run_until_complete(serving.serve(app, runtime, host, port, backlog=server.backlog, reuse_port=args.reuse_port, ready=announce))
    except serving.PortInUse as exc:
        print(f"imgproxy: {exc}", file=sys.stderr)
        return 2
    finally:
        loop.close()
    return 0


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
    rows = [("MODEL", "ALIASES", "PROVIDER", "UPSTREAM MODEL", "KEY")]
    for name, aliases, provider, upstream in gateway.routing.rows():
        spec = gateway.config.providers[gateway.config.models[name].provider]
        adapter = gateway.providers[spec.name]
        key = "not needed" if not adapter.needs_key else ("set" if spec.api_key else "MISSING: " + (" or ".join(spec.api_key_vars) or "api_key"))
        rows.append((name, aliases or "-", provider, upstream, key))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"{path}: valid, {len(gateway.config.models)} models")
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
