"""The ``medgemma-train`` command: a registry of subcommands.

Each subcommand is a :class:`Command` (name, one-line help, an ``add_arguments(parser)`` and a
``run(args) -> exit status``) named in :data:`COMMANDS` as ``"module:attribute"``, imported only
when the command line is parsed, so that ``--help`` stays quick. Another module adds a
subcommand with one line in :data:`COMMANDS` (the trainer's ``sft``, ``stages``, ``export``).
A user mistake raises :class:`UsageError` (or an ``EvalError``): one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PROG = "medgemma-train"


class UsageError(Exception):
    """A user mistake: printed as one line, exit status 2."""


@dataclass(frozen=True)
class Command:
    """One subcommand: ``add_arguments(parser)`` declares its options, ``run(args)`` runs it
    and returns the exit status. ``description``: the longer ``--help`` text."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""
    epilog: str = ""


#: subcommand name -> "module:attribute" of its :class:`Command`, in ``--help`` order.
COMMANDS: dict[str, str] = {
    "eval": "medgemma_train.evals.cli:EVAL",
    "compare": "medgemma_train.evals.cli:COMPARE",
    "tasks": "medgemma_train.evals.cli:TASKS",
    "stages": "medgemma_train.engine.commands:STAGES",
    "sft": "medgemma_train.engine.commands:SFT",
    "siglip": "medgemma_train.engine.commands:SIGLIP",
    "pretrain": "medgemma_train.engine.commands:PRETRAIN",
    "distill": "medgemma_train.engine.post_commands:DISTILL",
    "teacher-generate": "medgemma_train.engine.post_commands:TEACHER_GENERATE",
    "teacher-logits": "medgemma_train.engine.post_commands:TEACHER_LOGITS",
    "rl": "medgemma_train.engine.post_commands:RL",
    "rewards": "medgemma_train.engine.post_commands:REWARDS",
    "export": "medgemma_train.engine.commands:EXPORT",
}


def load_command(target: str) -> Command:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line (argparse would print the usage too)
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser(commands: dict[str, str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Train and evaluate MedGemma models.",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    for name, target in (commands or COMMANDS).items():
        cmd = load_command(target)
        sp = sub.add_parser(name, help=cmd.help.replace("%", "%%"),
                            description=cmd.description or cmd.help,
                            epilog=cmd.epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_arguments(sp)
        sp.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .evals.spec import EvalError

    try:
        args = build_parser().parse_args(argv)
        return int(args._run(args) or 0)
    except (UsageError, EvalError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # python -m: run the imported module's main, whose UsageError
    from medgemma_train.cli import main as _main  # is the one the commands raise

    raise SystemExit(_main())
