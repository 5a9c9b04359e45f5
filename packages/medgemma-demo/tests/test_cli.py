"""The ``medgemma-demo`` command's argument checks (no server is started)."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medgemma_demo", *args], capture_output=True,
                          text=True, timeout=120)


def test_help_explains_the_options():
    out = run("--help")
    assert out.returncode == 0
    for flag in ("--checkpoint", "--medsiglip", "--host", "--port", "--share", "--max-upload-mb"):
        assert flag in out.stdout
    assert "Research use only" in out.stdout


def test_missing_checkpoint_is_one_line_with_the_fix(tmp_path):
    out = run("--checkpoint", str(tmp_path / "nope"))
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert "no such file or folder" in lines[0] and "embedded default" in lines[0]


def test_missing_medsiglip_folder_and_bad_limits(tmp_path):
    out = run("--medsiglip", str(tmp_path / "nope"))
    assert out.returncode == 2 and "--medsiglip" in out.stderr and "Traceback" not in out.stderr
    out = run("--max-upload-mb", "0")
    assert out.returncode == 2 and "--max-upload-mb" in out.stderr


def test_port_in_use_is_one_line_before_anything_loads():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        out = run("--port", str(busy.getsockname()[1]))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "in use" in out.stderr and "--port" in out.stderr


def test_help_is_plain_text(capsys):
    """``medgemma-demo --help`` and each subcommand's help read as plain text: no reStructuredText
    or Markdown markup (double or single backticks, :func: roles) from docstrings."""
    import argparse
    import re

    import pytest

    from medgemma_demo.cli import _parser, main

    markup = re.compile(r"`|:(func|class|meth|mod|attr|obj|exc|ref|doc):")
    subparsers = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    commands = [[]] + [[name] for a in subparsers for name in a.choices]
    assert len(commands) == 1
    for command in commands:
        with pytest.raises(SystemExit) as done:
            main([*command, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: medgemma-demo"), command
        assert not markup.search(out), (command, markup.search(out))
