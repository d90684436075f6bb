"""The `pacs` commands (serve, import, reindex, verify, stats, audit, migrate): parse
arguments, map errors to exit codes.

Exit codes: 0 success, 1 problems found (import failures, verify
inconsistencies), 2 a bad config or command line (one line, no traceback).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from pacs.audit import BadTime, parse_moment, print_events
from pacs.config import Config, ConfigError, load, resolve_path
from pacs.endpoints import ListenError
from pacs.index.audit import EVENT_TYPES
from pacs.index.db import DatabaseURLError
from pacs.logs import setup_logging
from pacs.filestore import StoreWriteError

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE",
                        help="YAML config (default: $PACS_CONFIG, else config/pacs.yaml)")
    common.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="overrides logging.level from the config")
    parser = argparse.ArgumentParser(prog="pacs", description="A mini-PACS DICOM node.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", parents=[common], help="run the DICOM node until SIGTERM/SIGINT")
    serve.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)  # set by the supervisor
    imp = sub.add_parser("import", parents=[common], help="ingest DICOM files and folders")
    imp.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")
    for name, text in (("reindex", "rebuild the index from the file store alone"),
                       ("verify", "check store and index against each other"),
                       ("stats", "counts of patients, studies, series, instances, bytes")):
        cmd = sub.add_parser(name, parents=[common], help=text)
        if name != "stats":
            cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
    audit = sub.add_parser("audit", parents=[common],
                           help="print the audit trail of a time window")
    audit.add_argument("--since", required=True, metavar="WHEN",
                       help="ISO date/time (2024-05-01, 2024-05-01T08:00Z) or duration (12h, 7d)")
    audit.add_argument("--until", metavar="WHEN", help="end of the window, same forms")
    audit.add_argument("--type", choices=EVENT_TYPES, help="only this kind of event")
    audit.add_argument("--ae", metavar="TITLE", help="only events of this calling AE title")
    audit.add_argument("--json", action="store_true", help="one JSON object per line")
    mig = sub.add_parser("migrate", parents=[common],
                         help="copy the index into another (empty) database")
    mig.add_argument("--from", dest="source", metavar="URL",
                     help="the index to copy (default: database.url of the config)")
    mig.add_argument("--to", dest="target", metavar="URL", required=True,
                     help="the database to copy into, e.g. postgresql://user@host:5432/db")
    mig.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "audit":
        try:
            args.since, args.until = (None if when is None else parse_moment(when)
                                      for when in (args.since, args.until))
        except BadTime as exc:
            print(f"pacs audit: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        config = load(resolve_path(args.config))
        setup_logging(config, args.log_level)
    except ConfigError as exc:
        print(f"pacs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return _guarded(args, config, lambda: _run(args, config))


def _guarded(args: argparse.Namespace, config: Config, work: Callable[[], int]) -> int:
    """Run `work`, turning the config's environment problems into one line and exit 2."""
    try:
        return work()
    except DatabaseURLError as exc:
        print(f"pacs: {config.source}: database.url: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreWriteError as exc:
        print(f"pacs: {config.source}: storage.root: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    except ListenError as exc:  # `pacs serve` only
        print(f"pacs: {config.source}: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace, config: Config) -> int:
    if args.command == "serve":
        return _serve(args, config)
    if args.command == "migrate":
        return _migrate(args, config)
    from pacs import maintenance
    from pacs.archive import Archive

    archive = Archive(config)
    if args.command in ("import", "reindex"):  # what a killed run of either left behind
        archive.clean_staging()
    try:
        if args.command == "import":
            return _import(archive, args)
        if args.command == "reindex":
            summary = maintenance.reindex(archive, progress=not args.no_progress)
            for relpath, reason in summary.failed:
                print(f"unreadable: {relpath}: {reason}")
            print(f"reindexed {summary.indexed} instances, {len(summary.failed)} unreadable files")
            return EXIT_OK
        if args.command == "verify":
            problems = maintenance.verify(archive, progress=not args.no_progress)
            for line in problems:
                print(line)
            print(f"{len(problems)} problems" if problems else "store and index are consistent")
            return EXIT_PROBLEMS if problems else EXIT_OK
        if args.command == "audit":
            print_events(sys.stdout, args.since, args.until, args.type, args.ae, args.json)
            return EXIT_OK
        counts = maintenance.stats()
        for name in ("patients", "studies", "series", "instances", "bytes"):
            print(f"{name}: {getattr(counts, name)}")
        return EXIT_OK
    finally:
        archive.close()


def _serve(args: argparse.Namespace, config: Config) -> int:
    from pacs.supervisor import run_in_child, supervise, worker_count

    count = worker_count(config)
    if args.worker_fd is not None or count == 1:
        from pacs.node import serve

        return serve(config, channel_fd=args.worker_fd)
    # Create the schema and clear staging once, before any worker can race on
    # them, in a child: the supervisor itself never loads pydicom (~40 MB).
    code = run_in_child(lambda: _guarded(args, config, lambda: _prepare(config)))
    if code:
        return code
    extra = ["--log-level", args.log_level] if args.log_level else []
    return supervise(config, count, extra)


def _prepare(config: Config) -> int:
    from pacs.archive import Archive

    archive = Archive(config)
    archive.clean_staging()
    archive.close()
    return EXIT_OK


def _migrate(args: argparse.Namespace, config: Config) -> int:
    """Copy the index at --from (default: the config's) into the empty database at --to."""
    from pacs.index.db import close_database, open_database, open_unbound
    from pacs.index.transfer import TargetNotEmpty, copy_index

    source = args.source or config.database.url
    try:
        open_database(source)
    except DatabaseURLError as exc:
        print(f"pacs: --from: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        target = open_unbound(args.target)
        try:
            copied = copy_index(target, progress=not args.no_progress)
        finally:
            target.close()
    except (DatabaseURLError, TargetNotEmpty) as exc:
        print(f"pacs: --to: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        close_database()
    print("copied " + ", ".join(f"{count} {table}" for table, count in copied.items()))
    return EXIT_OK


def _import(archive, args: argparse.Namespace) -> int:
    from pacs import maintenance

    summary = maintenance.import_paths(archive, args.paths, progress=not args.no_progress)
    for path in summary.skipped:
        print(f"skipped (not DICOM): {path}")
    for path, reason in summary.failed:
        print(f"failed: {path}: {reason}")
    print(f"stored {summary.stored}, duplicates {summary.duplicates}, "
          f"skipped {len(summary.skipped)} non-DICOM, failed {len(summary.failed)}")
    return EXIT_PROBLEMS if summary.failed else EXIT_OK
