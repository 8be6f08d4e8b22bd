"""The ``edge-agent`` command: serve the model, and the operator's tools around it."""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from edge_agent import sdnotify
from edge_agent.checks import check_engine, format_results, run_checks
from edge_agent.config import ConfigError, Settings, load_settings
from edge_agent.engine.backend_choice import BackendChoiceError, backend_for
from edge_agent.logbook.cli import add_logbook_commands
from edge_agent.manifest import ManifestError, ModelManifest
from edge_agent.model_cli import add_model_commands
from edge_agent.model_store import (
    desired_model,
    read_pin,
    remove_pid,
    serving_manifest,
    write_pid,
)
from edge_agent.observability import configure_logging
from edge_agent.openapi import spec_yaml
from edge_agent.server.app import create_app, wait_until_loaded
from edge_agent.server.listener import start_listening
from edge_agent.server.model_routes import SWITCHER_KEY
from edge_agent.server.reload import apply_reload
from edge_agent.server.state import STATE_KEY

log = structlog.get_logger("edge_agent")


def _settings_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help="TOML config file (default: /etc/edge-agent/config.toml when it exists)",
    )
    parser.add_argument("--host", help="address to listen on (default 0.0.0.0: the whole LAN)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8080)")
    parser.add_argument(
        "--state-dir", type=Path, help="where the inference log lives (default /var/lib/edge-agent)"
    )
    parser.add_argument("--model", help="model manifest: a .toml path or a name in models/")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description=(
            "OpenAI-compatible LLM endpoint for this box. Settings come from flags, then "
            "EDGE_AGENT_* environment variables (EDGE_AGENT_PORT=9000, "
            "EDGE_AGENT_LOGS__MAX_BYTES=512Mi), then the config file."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the daemon",
        description="Serve /infer/openai/v1/* and the edge endpoints on one port.",
    )
    _settings_args(serve)
    serve.set_defaults(func=_serve)
    check = commands.add_parser(
        "check",
        help="verify config, model file and sha256, backend, port and state directory",
        description="Exit status 0 only when every check passes (install.sh runs this).",
    )
    _settings_args(check)
    check.add_argument(
        "--skip-port", action="store_true", help="skip the port check (the service is running)"
    )
    check.set_defaults(func=_check)
    probe = commands.add_parser(
        "probe-engine",
        help="prove llama.cpp decodes on this box, and which CPU configuration serves",
        description=(
            "Decode a few tokens with the model under each llama.cpp CPU configuration "
            "needed, each in a process of its own (a crash costs only that process), and "
            "cache the verdict that serve uses. Exit status 0 when one configuration decodes."
        ),
    )
    _settings_args(probe)
    probe.set_defaults(func=_probe_engine)
    add_logbook_commands(commands)
    add_model_commands(commands, _settings_args)
    add_api_spec_command(commands)
    return parser


def add_api_spec_command(subparsers: Any) -> None:
    """``edge-agent api-spec [-o FILE] [--config FILE] [--model M] [--server-url URL]``."""
    parser = subparsers.add_parser(
        "api-spec",
        help="write this deployment's OpenAPI 3.1.1 document",
        description=(
            "Write the OpenAPI 3.1.1 YAML of the endpoints this configuration serves "
            "(the OpenAI paths or the native /infer, by the model's OpenAI setting)."
        ),
    )
    parser.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    parser.add_argument("--config", type=Path, help="TOML config file")
    parser.add_argument("--model", help="model manifest: a .toml path or a name in models/")
    parser.add_argument(
        "--server-url", help="the URL clients reach the box by (default: http://<host>:<port>)"
    )
    parser.set_defaults(func=_api_spec)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


def _load(args: argparse.Namespace) -> tuple[Settings, ModelManifest]:
    settings = load_settings(
        args.config,
        host=args.host,
        port=args.port,
        state_dir=args.state_dir,
        model=args.model,
    )
    return settings, serving_manifest(settings)


def _probe_engine(args: argparse.Namespace) -> int:
    try:
        settings, manifest = _load(args)
    except (ConfigError, ManifestError) as exc:
        print(f"FAIL {exc}")
        return 1
    if manifest.gguf is None:
        print(f"FAIL model {manifest.name!r} has no [gguf] artifact for llama.cpp")
        return 1
    result = check_engine(settings, manifest)
    print(f"{'ok  ' if result.ok else 'FAIL'} {result.name}: {result.detail}")
    return 0 if result.ok else 1


def _check(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(
            args.config, host=args.host, port=args.port, state_dir=args.state_dir, model=args.model
        )
    except ConfigError as exc:
        print(f"FAIL config: {exc}\nsome checks failed")
        return 1
    results = run_checks(settings, check_port=not args.skip_port)
    print(format_results(results))
    return 0 if all(r.ok for r in results) else 1


def _api_spec(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config, model=args.model)
        manifest = serving_manifest(settings)
    except (ConfigError, ManifestError) as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2
    text = spec_yaml(
        settings, manifest, server_url=args.server_url or _default_server_url(settings)
    )
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _default_server_url(settings: Settings) -> str:
    # 0.0.0.0 is where the daemon listens, not an address a client can use.
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else socket.gethostname()
    return f"http://{host}:{settings.port}"


def _serve(args: argparse.Namespace) -> int:
    try:
        settings, manifest = _load(args)
        configure_logging(settings.log_format)
        backend = backend_for(settings, manifest)
        app = create_app(settings, manifest, backend, backend_factory=backend_for)
    except (ConfigError, ManifestError, BackendChoiceError, ValueError) as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_run(app, settings, args))


async def _run(app: web.Application, settings: Settings, args: argparse.Namespace) -> int:
    state = app[STATE_KEY]
    try:
        runner = await start_listening(app, settings)
    except OSError as exc:
        print(
            f"edge-agent: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr
        )
        return 2
    log.info("listening", host=settings.host, port=settings.port, pipeline=settings.pipeline)
    try:
        # `edge-agent models use` finds the daemon to signal here.
        write_pid(settings.state_dir)
    except OSError as exc:
        log.warning("pid_file_not_written", error=str(exc))
    watchdog = sdnotify.WatchdogPinger()
    watchdog.start()
    announcer = asyncio.create_task(_announce_when_ready(app))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reloads: set[asyncio.Task[None]] = set()  # held so a running reload is not collected

    def on_sighup() -> None:
        task = asyncio.create_task(_reload(app, args))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    await stop.wait()

    # Readiness drops first: new requests get 503 while in-flight streams finish.
    grace = state.settings.shutdown_grace_s
    in_flight = sum(m.scheduler.in_flight for m in state.all_served())
    sdnotify.stopping(f"draining {in_flight} sequences")
    log.info("stopping", in_flight=in_flight, grace_s=grace)
    if not await state.drain(grace):
        in_flight = sum(m.scheduler.in_flight for m in state.all_served())
        log.warning("grace_period_over", in_flight=in_flight)
    remove_pid(settings.state_dir)
    announcer.cancel()
    await runner.cleanup()  # closes the backend, then flushes and closes the log store
    await watchdog.stop()
    log.info("stopped")
    return 0


async def _announce_when_ready(app: web.Application) -> None:
    """READY=1 only once the model is loaded and the port is serving."""
    await wait_until_loaded(app)
    state = app[STATE_KEY]
    if state.status == "Running":
        sdnotify.ready(f"serving {state.manifest.name} on {state.backend.info.name}")
    else:
        sdnotify.status(state.status_detail)


async def _reload(app: web.Application, args: argparse.Namespace) -> None:
    state = app[STATE_KEY]
    sdnotify.reloading()
    try:
        new = load_settings(
            args.config, host=args.host, port=args.port, state_dir=args.state_dir, model=args.model
        )
    except ConfigError as exc:
        log.error("reload_rejected", error=str(exc))
    else:
        applied, needs_restart = apply_reload(state, new)
        log.info("reloaded", applied=applied, needs_restart=needs_restart)
        if needs_restart:
            log.warning("reload_needs_restart", settings=needs_restart)
        # A new `model` in the file, or `edge-agent models use`: the same swap as the API's.
        wanted = desired_model(state.settings.model, read_pin(state.settings.state_dir))
        result = await app[SWITCHER_KEY].switch(wanted, origin="sighup")
        if result.outcome != "unchanged":
            log.info("reload_model_swap", outcome=result.outcome, detail=result.detail)
    sdnotify.ready(f"serving {state.manifest.name} (reloaded)")


if __name__ == "__main__":
    sys.exit(main())
