"""The ``edge-agent`` command: serve the model, and the operator's tools around it."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import structlog
from aiohttp import web

from edge_agent.config import ConfigError, Settings, load_settings
from edge_agent.engine.backend_choice import BackendChoiceError, build_backend, choose_backend
from edge_agent.engine.types import Backend
from edge_agent.logbook.cli import add_logbook_commands
from edge_agent.manifest import ManifestError, ModelManifest, load_manifest
from edge_agent.observability import configure_logging
from edge_agent.openapi import add_api_spec_command
from edge_agent.server.app import create_app

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
    add_logbook_commands(commands)
    add_api_spec_command(commands)
    return parser


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
    return settings, load_manifest(settings.model)


def make_backend(settings: Settings, manifest: ModelManifest) -> Backend:
    """vLLM on a CUDA box that has it, llama.cpp otherwise; one log line says which and why."""
    choice = choose_backend(settings.backend, manifest)
    log.info("backend_chosen", backend=choice.name, reason=choice.reason)
    return build_backend(choice, manifest, settings)


def _serve(args: argparse.Namespace) -> int:
    try:
        settings, manifest = _load(args)
        configure_logging(settings.log_format)
        backend = make_backend(settings, manifest)
        app = create_app(settings, manifest, backend)
    except (ConfigError, ManifestError, BackendChoiceError, ValueError) as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_run(app, settings))


async def _run(app: web.Application, settings: Settings) -> int:
    from edge_agent.server.state import STATE_KEY

    # Cancel a handler when its client goes away, so its generation stops at once.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        print(
            f"edge-agent: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr
        )
        await runner.cleanup()
        return 2
    log.info("listening", host=settings.host, port=settings.port, pipeline=settings.pipeline)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    state = app[STATE_KEY]
    log.info("stopping", in_flight=state.scheduler.in_flight, grace_s=settings.shutdown_grace_s)
    drained = await state.scheduler.drain(settings.shutdown_grace_s)
    if not drained:
        log.warning("grace_period_over", in_flight=state.scheduler.in_flight)
    await runner.cleanup()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
