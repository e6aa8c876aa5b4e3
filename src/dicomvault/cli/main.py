"""The ``dicomvault`` command. Every command is an operation contributed by a
plugin; this module only parses, dispatches and prints."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import msgspec

from dicomvault import __version__
from dicomvault.engine import (
    EXIT_FAILED,
    EXIT_USAGE,
    Context,
    DicomvaultError,
    Hooks,
    Operation,
    Report,
    UsageError,
    make_plugin_manager,
)
from dicomvault.engine.passphrase import PassphraseSource

from .progress import ProgressReporter, print_error
from .summary import print_summary

log = logging.getLogger("dicomvault")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # "dicomvault: error: import-dicom: ...", not "dicomvault: error: dicomvault import-dicom: ..."
        command = self.prog.removeprefix("dicomvault").strip()
        raise UsageError(f"{command}: {message}" if command else message)


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    d = argparse.SUPPRESS if suppress else None
    parser.add_argument("--db", default=d, metavar="PATH",
                        help="the database (default: $DICOMVAULT_DB or the user data directory)")
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="print the result as JSON on stdout")
    parser.add_argument("-q", "--quiet", action="store_true",
                        default=argparse.SUPPRESS if suppress else False, help="no progress display")
    parser.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS if suppress else 0,
                        help="more log output on stderr")


def build_parser(operations: Sequence[Operation]) -> argparse.ArgumentParser:
    parser = _Parser(prog="dicomvault", description="Backup and export engine for DICOM image databases.")
    parser.add_argument("--version", action="version", version=f"dicomvault {__version__}")
    _common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for op in sorted(operations, key=lambda o: o.name):
        p = sub.add_parser(op.name, help=op.help, description=op.help)
        _common(p, suppress=True)
        op.configure(p)
        p.set_defaults(_operation=op)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.umask(0o077)  # everything we write is private to the user: it is patient data
    stderr = logging.StreamHandler()
    stderr.setFormatter(logging.Formatter("dicomvault: %(levelname)s: %(message)s"))
    log.addHandler(stderr)
    log.setLevel(logging.WARNING)
    ctx: Context | None = None
    if sys.stdout is None:  # >&-: the command still runs, what it would print goes nowhere
        sys.stdout = open(os.devnull, "w")  # for the life of the process
    as_json = _asks_for_json(sys.argv[1:] if argv is None else argv)
    try:
        pm = make_plugin_manager(autoload=not os.environ.get("DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD"))
        hooks = Hooks(pm)
        parser = build_parser(hooks.operations())
        args = parser.parse_args(argv)
        as_json = bool(args.json)
        if args.verbose:
            log.setLevel(logging.INFO if args.verbose == 1 else logging.DEBUG)
        op: Operation | None = getattr(args, "_operation", None)
        if op is None:
            if sys.stderr is not None:  # print_help(None) would write to stdout
                parser.print_help(sys.stderr)
            return _failed("no command given (see dicomvault --help)", EXIT_USAGE, as_json, quiet=True)
        ctx = Context(hooks, args.db, json_output=args.json, quiet=args.quiet)
        pm.register(ProgressReporter(ctx, show_bar=not (args.quiet or args.json)), name="cli-progress")
        ctx.force = bool(getattr(args, "force", False))
        ctx.passphrase = PassphraseSource.from_args(args)
        result = op.run(ctx, args)
    except DicomvaultError as exc:
        return _failed(str(exc), exc.exit_code, as_json)
    except KeyboardInterrupt:
        return _failed("interrupted; everything committed so far is kept, nothing is half-written", 130,
                       as_json)
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_FAILED
    except OSError as exc:  # the file system said no (disk full, name too long): a message, no traceback
        return _failed(str(exc), EXIT_FAILED, as_json)
    finally:
        log.removeHandler(stderr)  # main() may run many times in one process (tests, scripts)
        if ctx is not None:
            ctx.close()
    if isinstance(result, Report):
        try:
            if args.json:
                sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
                sys.stdout.flush()
            elif not args.quiet or result.problems:
                print_summary(result)
                sys.stdout.flush()
        except BrokenPipeError:  # the reader went away (| head): the work itself is done
            _silence_stdout()
        return result.exit_code
    return int(result)


def _asks_for_json(argv: Sequence[str]) -> bool:
    """Whether the command line asks for --json, read before (and whether or
    not) the full parse succeeds: a usage error must honour it too. Only the
    option itself, or a prefix argparse would take for it, before ``--``."""
    before = list(argv[:list(argv).index("--")]) if "--" in argv else list(argv)
    probe = _Parser(add_help=False)  # errors raise UsageError instead of exiting
    probe.add_argument("--json", action="store_true")
    try:
        known, _rest = probe.parse_known_args(before)
    except UsageError:  # "--json=x", say: the real parse says what is wrong
        return False
    return bool(known.json)


def _silence_stdout() -> None:
    """After a broken pipe: later writes (and the flush at exit) go nowhere."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _failed(message: str, code: int, as_json: bool, *, quiet: bool = False) -> int:
    """The one line on stderr (unless ``quiet``: said already); with
    ``--json`` also ``{"error", "exit_code"}`` on stdout, so that a script
    reading JSON gets JSON when the command fails."""
    if not quiet:
        print_error(f"dicomvault: error: {message}" if code != 130 else f"dicomvault: {message}")
    if as_json:
        try:
            sys.stdout.write(msgspec.json.encode({"error": message, "exit_code": code}).decode() + "\n")
            sys.stdout.flush()
        except (OSError, ValueError, AttributeError):  # stdout gone or closed: stderr said it
            pass
    return code


if __name__ == "__main__":
    sys.exit(main())
