"""Coverage-guided fuzzing of one target with atheris (libFuzzer), in this process.

libFuzzer owns the process from :func:`run` on and exits it when done: the caller
(:mod:`fuzz.__main__`) runs this in a child process and reads libFuzzer's closing lines
(``Done N runs in S second(s)``, crash reports) from its output.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

from .engine import RSS_LIMIT_MB, TIME_LIMIT_S, Target, Watchdog, execute

OURS = ("medgemma_data", "medgemma_demo", "medgemma_core", "medsiglip")


def _import_all(name: str) -> None:
    """Import ``name`` and, for this repository's packages, every submodule (plugins are
    imported lazily otherwise, after instrumentation, and would give no coverage)."""
    import pkgutil

    module = importlib.import_module(name)
    if name not in OURS or not hasattr(module, "__path__"):
        return
    for info in pkgutil.walk_packages(module.__path__, f"{name}."):
        if info.name.endswith(".__main__"):  # importing it runs the command line
            continue
        try:
            importlib.import_module(info.name)
        except ImportError:  # an optional dependency (pytest for the plugin test kit)
            pass


class FuzzFinding(Exception):
    """Raised to libFuzzer for an input outside the contract (it saves the input)."""


def run(target: Target, *, runs: int, work: Path, out: Path, seed: int) -> None:
    import atheris

    with atheris.instrument_imports(include=list(target.instrument)):
        for name in target.instrument:
            _import_all(name)
    errors = target.errors()
    seeds_dir, corpus = work / "seeds", out / "corpus" / target.name
    inputs = work / "inputs"
    for d in (seeds_dir, corpus, inputs):
        d.mkdir(parents=True, exist_ok=True)
    seeds = target.seeds(seeds_dir)
    for k, data in enumerate(seeds):
        (seeds_dir / f"seed{k:04d}").write_bytes(data)
    artifacts = out / "artifacts" / target.name
    artifacts.mkdir(parents=True, exist_ok=True)
    watchdog = Watchdog(out / f"{target.name}.watchdog.json", target.name,
                        time_limit=TIME_LIMIT_S * 2, rss_limit_mb=RSS_LIMIT_MB * 1.25)
    counter = iter(range(10**12))

    def one(data: bytes) -> None:
        k = next(counter)
        folder = inputs / f"in{k}"
        folder.mkdir()
        keep = inputs / f"in{k}.bin"
        keep.write_bytes(data)
        watchdog.begin(keep)
        finding = execute(target, data, folder, errors)
        watchdog.end()
        shutil.rmtree(folder, ignore_errors=True)
        keep.unlink()
        if finding is not None:
            raise FuzzFinding(f"{finding.kind} {finding.signature}: {finding.message}")

    max_len = max(len(s) for s in seeds) + 1024
    atheris.Setup([sys.argv[0], f"-runs={runs}", f"-seed={seed}",
                   f"-timeout={int(TIME_LIMIT_S)}", f"-rss_limit_mb={RSS_LIMIT_MB}",
                   f"-max_len={max_len}", "-print_final_stats=1",
                   f"-artifact_prefix={artifacts}/", str(corpus), str(seeds_dir)], one)
    atheris.Fuzz()
