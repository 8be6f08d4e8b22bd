"""``edge-agent models install | use | rollback | list``: the box's model library, by hand.

``use`` asks the running daemon for a swap the way ``systemctl reload`` does: it records
the choice in the state directory (the pin) and sends SIGHUP; the daemon swaps through
the same code as ``PUT /models/active``, and this command waits for the outcome it
writes, so its exit status says whether the new model serves.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.config import ConfigError, Settings, load_settings
from edge_agent.manifest import ManifestError, load_manifest
from edge_agent.model_store import (
    InstallError,
    ModelPin,
    clear_pin,
    desired_model,
    find_model,
    install,
    installed_models,
    read_pin,
    read_swap_outcome,
    running_daemon,
    write_pin,
)


def add_model_commands(
    subparsers: Any, settings_args: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add ``models`` and its subcommands; each sets ``func`` returning the exit status."""
    models = subparsers.add_parser(
        "models",
        help="install models on this box and swap the serving one without a restart",
        description="The box's model library (in the state directory) and which model serves.",
    )
    commands = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    add = commands.add_parser(
        "install",
        help="copy a model (manifest or GGUF) into the state directory, checking its sha256",
    )
    settings_args(add)
    add.add_argument("source", help="a manifest (.toml, or a name) or a .gguf file")
    add.add_argument("--name", help="the installed model's name (default: the manifest's)")
    add.add_argument("--sha256", help="the GGUF's expected sha256 (checked as it is copied)")
    add.add_argument("--context-length", type=int, help="tokens per sequence (GGUF only)")
    add.add_argument("--use", action="store_true", help="then swap to it, as `models use`")
    add.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for a swap")
    add.set_defaults(func=_with_settings(_install))

    use = commands.add_parser(
        "use", help="swap the running daemon to a model, without dropping a request"
    )
    settings_args(use)
    use.add_argument("name", help="an installed model's name, or a manifest name or path")
    use.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the swap")
    use.set_defaults(func=_with_settings(_use))

    back = commands.add_parser(
        "rollback", help="swap back to the model served before the last swap"
    )
    settings_args(back)
    back.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the swap")
    back.set_defaults(func=_with_settings(_rollback))

    listing = commands.add_parser("list", help="the installed models, and which one serves")
    settings_args(listing)
    listing.set_defaults(func=_with_settings(_list))


Action = Callable[[argparse.Namespace, Settings], int]


def _with_settings(action: Action) -> Callable[[argparse.Namespace], int]:
    """The action, given the settings its flags and config file make (exit 2 if they fail)."""

    def run(args: argparse.Namespace) -> int:
        try:
            settings = load_settings(args.config, state_dir=args.state_dir, model=args.model)
        except ConfigError as exc:
            print(f"FAIL {exc}", file=sys.stderr)
            return 2
        return action(args, settings)

    return run


def _install(args: argparse.Namespace, settings: Settings) -> int:
    try:
        installed = install(
            args.source,
            settings.state_dir,
            name=args.name,
            sha256=args.sha256,
            context_length=args.context_length,
        )
    except (InstallError, ManifestError, OSError) as exc:
        print(f"FAIL install: {exc}", file=sys.stderr)
        return 1
    print(
        f"installed {installed.name}: {installed.gguf} "
        f"({installed.bytes / 2**20:.1f} MiB, sha256 {installed.sha256})"
    )
    if not args.use:
        return 0
    return _swap(settings, installed.name, args.timeout)


def _use(args: argparse.Namespace, settings: Settings) -> int:
    return _swap(settings, args.name, args.timeout)


def _rollback(args: argparse.Namespace, settings: Settings) -> int:
    pin = read_pin(settings.state_dir)
    if pin is None or pin.previous is None:
        print("FAIL rollback: no swap recorded on this box, nothing to go back to", file=sys.stderr)
        return 1
    return _swap(settings, pin.previous, args.timeout)


def _swap(settings: Settings, name: str, timeout: float) -> int:
    state_dir = settings.state_dir
    try:
        manifest = find_model(name, state_dir)
    except ManifestError as exc:
        print(f"FAIL use: {exc}", file=sys.stderr)
        return 2
    # A path is kept absolute: the daemon resolves it from its own working directory.
    target = str(Path(name).resolve()) if Path(name).suffix == ".toml" else name
    pin = read_pin(state_dir)
    serving = desired_model(settings.model, pin)
    before = read_swap_outcome(state_dir)
    write_pin(state_dir, ModelPin(target, settings.model, serving if serving != target else None))
    pid = running_daemon(state_dir)
    if pid is None:
        print(f"edge-agent is not running here: {manifest.name} serves from its next start")
        return 0
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        _restore_pin(state_dir, pin)
        print(
            f"FAIL not allowed to signal edge-agent (pid {pid}): run as root or as its user",
            file=sys.stderr,
        )
        return 1
    print(f"asked edge-agent (pid {pid}) to swap to {manifest.name}; waiting")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcome = read_swap_outcome(state_dir)
        if outcome is not None and (before is None or outcome.serial > before.serial):
            if outcome.ok:
                print(f"ok   {outcome.detail}")
                return 0
            _restore_pin(state_dir, pin)  # the model serving is still the one chosen before
            print(f"FAIL swap to {manifest.name}: {outcome.detail}", file=sys.stderr)
            return 1
        time.sleep(0.2)
    print(f"FAIL no answer from edge-agent within {timeout:g}s; see its log", file=sys.stderr)
    return 1


def _restore_pin(state_dir: Path, pin: ModelPin | None) -> None:
    if pin is not None:
        write_pin(state_dir, pin)
    else:
        clear_pin(state_dir)


def _list(args: argparse.Namespace, settings: Settings) -> int:
    pin = read_pin(settings.state_dir)
    serving = desired_model(settings.model, pin)
    try:
        serving_name = find_model(serving, settings.state_dir).name
    except ManifestError:
        serving_name = serving
    previous = pin.previous if pin else None
    for path in installed_models(settings.state_dir):
        try:
            manifest = load_manifest(str(path))
        except ManifestError as exc:
            print(f"  ?       {path.stem}: {exc}")
            continue
        mark = (
            "serving "
            if manifest.name == serving_name
            else "previous"
            if manifest.name == previous
            else "        "
        )
        print(f"  {mark} {manifest.name}  sha256 {manifest.sha256[:16]}  {manifest.gguf_path()}")
    print(f"serving: {serving_name}" + (f" (previous: {previous})" if previous else ""))
    outcome = read_swap_outcome(settings.state_dir)
    if outcome is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(outcome.time))
        verdict = "ok" if outcome.ok else "FAILED"
        print(f"last swap: {when} {outcome.model}: {verdict} {outcome.detail}")
    return 0
