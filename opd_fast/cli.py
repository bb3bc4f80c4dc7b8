"""The ``opd-fast`` command line.

Each subcommand lives in its own module under ``opd_fast/commands/`` exposing
``register(subparsers)``, which adds a parser whose ``func(args) -> int`` runs it. Modules are
imported lazily by name so that ``opd-fast --help`` stays fast.

``main(argv)`` raises what the commands raise (for callers and tests); ``console`` is the installed
``opd-fast`` command: a user error (a bad config value, a missing file) is one line on stderr and
exit status 2, and ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# One entry per module in opd_fast/commands/ (add yours here).
SUBCOMMAND_MODULES: tuple[str, ...] = ("demo", "bench", "train", "eval", "generate", "plot", "kernels")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, flags): the help says what happens."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="opd-fast", description="Fast on-policy distillation of language models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"opd_fast.commands.{name}").register(sub)
    for command in sub.choices.values():  # every subcommand's --help shows its defaults
        command.formatter_class = HelpFormatter
        for action in command._actions:  # the formatter only annotates options that have a help text
            if action.help is None and action.option_strings and action.default not in (None, argparse.SUPPRESS):
                action.help = "(default: %(default)s)"
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def console() -> None:
    """The ``opd-fast`` entry point: ``main`` with user errors as one line (``--debug``: traceback)."""
    argv = sys.argv[1:]
    try:
        sys.exit(main(argv))
    except (ValueError, OSError) as exc:
        if "--debug" in argv:
            raise
        print(f"opd-fast: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    console()
