"""``edge-agent logs`` and ``edge-agent collect``: added to the main CLI's subcommands."""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

from edge_agent.logbook.store import DB_FILENAME, MAX_READ_LIMIT, read_records

DEFAULT_STATE_DIR = Path("/var/lib/edge-agent")


def add_logbook_commands(subparsers: Any) -> None:
    """Add ``logs`` and ``collect`` to an ``argparse`` subparsers object.

    Each parser gets ``func``: call ``args.func(args)`` for the exit code.
    """
    logs = subparsers.add_parser(
        "logs",
        help="print recent inference log records (JSON lines, newest first)",
        description="Read the local inference log; safe while the daemon runs.",
    )
    logs.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    logs.add_argument("--limit", type=int, default=100, help=f"at most {MAX_READ_LIMIT}")
    logs.add_argument("--since", default=None, help="only records with an id after this one")
    logs.set_defaults(func=run_logs)

    collect = subparsers.add_parser(
        "collect",
        help="run the reference log collector",
        description="Receive upload batches from edge boxes, dedupe, write daily JSON lines.",
    )
    collect.add_argument("--listen", default="0.0.0.0:8090", metavar="HOST:PORT")
    collect.add_argument("--out", type=Path, required=True, metavar="DIR")
    collect.set_defaults(func=run_collect)


def run_logs(args: argparse.Namespace) -> int:
    path = Path(args.state_dir) / DB_FILENAME
    if not path.is_file():
        print(f"edge-agent logs: no inference log at {path}", file=sys.stderr)
        return 1
    if not 1 <= args.limit <= MAX_READ_LIMIT:
        print(f"edge-agent logs: --limit must be 1..{MAX_READ_LIMIT}", file=sys.stderr)
        return 2
    try:
        # Read-only: this must never create, migrate or move aside the daemon's file.
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            records, has_more = read_records(conn, args.limit, args.since)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        print(f"edge-agent logs: cannot read {path}: {exc}", file=sys.stderr)
        return 1
    for record in records:
        print(json.dumps(record, ensure_ascii=False))
    if has_more:
        print("edge-agent logs: more records match; raise --limit", file=sys.stderr)
    return 0


def run_collect(args: argparse.Namespace) -> int:
    from edge_agent.logbook.collector import run_collector

    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        print(f"edge-agent collect: {exc}", file=sys.stderr)
        return 2
    run_collector(host, port, args.out)
    return 0


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8090`` for IPv6) into its parts."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen wants HOST:PORT, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)
