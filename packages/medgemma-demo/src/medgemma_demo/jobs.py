"""Background ``medgemma-train`` runs for the Train and Evaluate tabs, through its command line.

A :class:`Job` is one ``medgemma-train`` process writing into its own run folder; the tabs
poll the files it writes (``metrics.jsonl`` while training, ``items.jsonl`` while evaluating,
``summary.json`` at the end). :class:`JobSlot` allows one job at a time per server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def train_command() -> list[str]:
    """``medgemma-train`` (beside this interpreter, else on PATH, else ``python -m``)."""
    here = Path(sys.executable).with_name("medgemma-train")
    if here.is_file():
        return [str(here)]
    found = shutil.which("medgemma-train")
    return [found] if found else [sys.executable, "-m", "medgemma_train.cli"]


class Job:
    """``medgemma-train ARGS`` in a background process; output in ``folder/log.txt``."""

    def __init__(self, kind: str, args: Sequence[str], folder: Path):
        self.kind = kind
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.args = [*train_command(), *args]
        self.started = time.monotonic()
        self.ended: float | None = None
        self.stopped = False
        log = open(self.folder / "log.txt", "w", encoding="utf-8")  # noqa: SIM115
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    @property
    def running(self) -> bool:
        if self.proc.poll() is None:
            return True
        if self.ended is None:
            self.ended = time.monotonic()
        return False

    @property
    def elapsed(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (the trainer saves a checkpoint and exits), then SIGKILL after ``timeout``."""
        if self.proc.poll() is not None:
            return
        self.stopped = True
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, lines: int = 6) -> str:
        try:
            text = (self.folder / "log.txt").read_text(errors="replace")
        except OSError:
            return ""
        # progress bars rewrite one line with \r: keep the last state of each
        return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])

    def error_line(self) -> str:
        """The last line that says what went wrong (a failed run)."""
        for line in reversed(self.log_tail(40).splitlines()):
            if "error" in line.lower() or line.startswith(("medgemma-train", "Traceback")):
                return line.strip()
        return self.log_tail(1).strip() or f"exit status {self.returncode}"


class JobSlot:
    """At most one job per server; :meth:`start` refuses a second while one runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.job: Job | None = None

    def start(self, kind: str, args: Sequence[str], folder: Path) -> Job:
        with self._lock:
            if self.job is not None and self.job.running:
                raise RuntimeError(f"a {self.job.kind} run is going on this server (one run at "
                                   "a time); wait for it or stop it")
            self.job = Job(kind, args, folder)
            return self.job


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSON-lines file being written (a partial last line skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def zip_folder(folder: Path, target: Path) -> Path:
    """``folder``'s files into ``target`` (a .zip), paths relative to ``folder``."""
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(folder))
    return target
