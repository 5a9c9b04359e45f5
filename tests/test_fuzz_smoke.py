"""The fuzz smoke run of the default CI: every target of fuzz/ (the repository's fuzz harness),
300 inputs each with the seeded mutator and a fixed seed, in a child process per target.

Each run must keep the contract on every input (no finding, no input over 5 s, the process
under 2 GB), and its seeds must mostly give valid results: a target whose seeds all fail
would exercise nothing but error paths. The long run is ``nox -s fuzz`` (atheris, >= 10,000
inputs per target); see fuzz/README.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNS = 300
sys.path.insert(0, str(ROOT))
from fuzz.registry import targets  # noqa: E402


@pytest.mark.parametrize("name", [t.name for t in targets()])
def test_fuzz_smoke(name: str, tmp_path: Path):
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "fuzz", "mutate", name, "--runs", str(RUNS), "--seed", "0",
         "--report", str(report), "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert report.is_file(), result.stderr[-3000:]
    stats = json.loads(report.read_text())
    findings = [f"{f['kind']} {f['signature']}: {f['message']} ({f['path']})"
                for f in stats["findings"]]
    assert not findings, "\n".join(findings)
    assert result.returncode == 0, result.stderr[-3000:]
    assert stats["executions"] == RUNS
    seeds = stats["seed_outcomes"]
    assert seeds and seeds.count("ok") * 2 >= len(seeds), f"seeds: {seeds}"
