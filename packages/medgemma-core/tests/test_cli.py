"""The ``medgemma`` command's help texts."""

from __future__ import annotations


def test_help_is_plain_text(capsys):
    """``medgemma --help`` and each subcommand's help read as plain text: no reStructuredText
    or Markdown markup (double or single backticks, :func: roles) from docstrings."""
    import argparse
    import re

    import pytest

    from medgemma_core.cli import _parser, main

    markup = re.compile(r"`|:(func|class|meth|mod|attr|obj|exc|ref|doc):")
    subparsers = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    commands = [[]] + [[name] for a in subparsers for name in a.choices]
    assert len(commands) == 4  # medgemma, generate, chat, convert
    for command in commands:
        with pytest.raises(SystemExit) as done:
            main([*command, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: medgemma"), command
        assert not markup.search(out), (command, markup.search(out))
