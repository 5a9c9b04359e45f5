"""Command line of the fuzz harness (run from the repository root).

    python -m fuzz list
    python -m fuzz seeds TARGET                                          # each seed's outcome
    python -m fuzz mutate TARGET [--runs N] [--seed S] [--report FILE]   # the seeded mutator
    python -m fuzz atheris TARGET [--runs N]                             # coverage-guided
    python -m fuzz all [--engine auto|atheris|mutate] [--runs N] [--only PREFIX]...
    python -m fuzz minimise TARGET INPUT --out FILE

``all`` runs each target in a child process, one at a time, prints one line per target
(executions, seconds, findings) and writes ``summary.json``; it exits 1 when any target has
a finding or ran fewer than ``--runs`` executions. Outputs go under ``--out`` (default
``.nox/_cache/fuzz``): findings, atheris corpora and artifacts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .engine import WATCHDOG_EXIT, Watchdog, minimise, mutation_run, seed_outcomes
from .registry import find, targets

ROOT = Path(__file__).resolve().parents[1]
# beside nox's caches; not .nox/fuzz, which is the nox session's own venv
DEFAULT_OUT = ROOT / ".nox" / "_cache" / "fuzz"
# inputs are written to files: on tmpfs when there is one (no disk stalls under load)
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def _cmd_list(_: argparse.Namespace) -> int:
    for t in targets():
        print(f"{t.name:18s} {t.package:14s} {t.doc}")
    return 0


def _cmd_seeds(args: argparse.Namespace) -> int:
    """What each seed of a target gives unmutated (a seed that errors tests little)."""
    target = find(args.target)
    with tempfile.TemporaryDirectory() as tmp:
        results = seed_outcomes(target, Path(tmp))
    print(json.dumps({"target": target.name, "outcomes": results}))
    return 0


def _cmd_mutate(args: argparse.Namespace) -> int:
    target = find(args.target)
    out = Path(args.out)
    report = Path(args.report) if args.report else out / f"{target.name}.mutate.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    watchdog = Watchdog(report, target.name)
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target.name}-", dir=SCRATCH) as tmp:
        stats = mutation_run(target, runs=args.runs, seed=args.seed, work=Path(tmp),
                             out=out / "findings" / target.name, watchdog=watchdog,
                             max_seconds=args.max_seconds)
    report.write_text(json.dumps(stats.as_dict(), indent=1))
    print(f"fuzz: {target.name}: {stats.executions} executions in {stats.seconds:.1f} s, "
          f"slowest {stats.slowest_s:.2f} s, peak RSS {stats.peak_rss_mb:.0f} MiB, "
          f"{len(stats.findings)} findings", file=sys.stderr)
    return 1 if stats.findings else 0


def _cmd_atheris(args: argparse.Namespace) -> int:
    from .atheris_driver import run

    target = find(args.target)
    # libFuzzer exits the process without cleaning up: `all` passes a folder it removes
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix=f"fuzz-{target.name}-",
                                                                   dir=SCRATCH))
    run(target, runs=args.runs, work=work, out=Path(args.out), seed=args.seed)
    return 0  # not reached: libFuzzer exits the process


def _cmd_minimise(args: argparse.Namespace) -> int:
    target = find(args.target)
    data = Path(args.input).read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        small = minimise(target, data, Path(tmp))
    Path(args.out).write_bytes(small)
    print(f"fuzz: {len(data)} -> {len(small)} bytes: {args.out}", file=sys.stderr)
    return 0


def _has_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


_DONE = re.compile(r"Done (\d+) runs in (\d+) second")


def _child(engine: str, name: str, args: argparse.Namespace) -> dict[str, object]:
    out = Path(args.out)
    log = out / "logs" / f"{name}.{engine}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    report = out / f"{name}.{engine}.json"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "fuzz", engine, name, "--runs", str(args.runs),
           "--seed", str(args.seed), "--out", str(out)]
    if engine == "mutate":
        cmd += ["--report", str(report)]
    start = time.monotonic()
    with open(log, "w") as f, tempfile.TemporaryDirectory(prefix="fuzz-", dir=SCRATCH) as work:
        if engine == "atheris":
            cmd += ["--work", work]
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - start
    text = log.read_text(errors="replace")
    row: dict[str, object] = {"target": name, "engine": engine, "rc": rc, "wall_s": round(wall, 1),
                              "log": str(log)}
    if engine == "mutate" and report.is_file():
        stats = json.loads(report.read_text())
        row["executions"] = stats.get("executions", 0)
        row["findings"] = stats.get("findings", [])
    elif engine == "atheris":
        done = _DONE.findall(text)
        row["executions"] = int(done[-1][0]) if done else 0
        crashes = re.findall(r"Test unit written to (\S+)", text)
        errors = [ln for ln in text.splitlines()
                  if "FuzzFinding" in ln or "==ERROR" in ln or "ALARM" in ln]
        row["findings"] = [{"artifact": c, "message": errors[-1] if errors else ""}
                           for c in crashes]
    if rc == WATCHDOG_EXIT and report.is_file():
        row["findings"] = json.loads(report.read_text()).get("findings", [])
    watch = out / f"{name}.watchdog.json"
    if watch.is_file():
        row["findings"] = list(row.get("findings", [])) + json.loads(
            watch.read_text()).get("findings", [])
        watch.unlink()
    if rc != 0 and not row.get("findings"):
        row["findings"] = [{"message": f"exit status {rc}; see {log}"}]
    return row


def _cmd_all(args: argparse.Namespace) -> int:
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if _has_atheris() else "mutate"
        if engine == "mutate":
            print("fuzz: atheris is not installed here; using the seeded mutator", file=sys.stderr)
    chosen = [t for t in targets() if not args.only or any(t.name.startswith(p)
                                                           for p in args.only)]
    rows, bad = [], 0
    for t in chosen:
        row = _child(engine, t.name, args)
        rows.append(row)
        short = int(row.get("executions", 0)) < args.runs
        n = len(row.get("findings", []))
        bad += bool(n or short)
        print(f"{t.name:18s} {engine:8s} {row.get('executions', 0):>7} executions "
              f"{row['wall_s']:>7.1f} s  {n} findings" + ("  (too few executions)" if short
                                                         else ""), flush=True)
        for f in row.get("findings", []):
            print(f"    {f.get('signature', '')} {f.get('message', '')} "
                  f"{f.get('path', f.get('artifact', ''))}", flush=True)
    summary = Path(args.out) / "summary.json"
    summary.write_text(json.dumps(rows, indent=1))
    total = sum(int(r.get("executions", 0)) for r in rows)
    print(f"fuzz: {len(rows)} targets, {total} executions, "
          f"{sum(len(r.get('findings', [])) for r in rows)} findings; {summary}", flush=True)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.simplefilter("ignore")  # readers warn on odd inputs; only the contract matters
    os.environ["RUST_BACKTRACE"] = "0"  # a Rust decoder's panic: one line, not a backtrace
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    sub.add_parser("seeds").add_argument("target")
    for name in ("mutate", "atheris", "all"):
        p = sub.add_parser(name)
        if name != "all":
            p.add_argument("target")
        p.add_argument("--runs", type=int, default=10_000)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", default=os.environ.get("MEDGEMMA_FUZZ_OUT", str(DEFAULT_OUT)))
        if name == "atheris":
            p.add_argument("--work", help="scratch folder for the inputs (default: a new one)")
        if name == "mutate":
            p.add_argument("--report")
            p.add_argument("--max-seconds", type=float)
        if name == "all":
            p.add_argument("--engine", choices=("auto", "atheris", "mutate"), default="auto")
            p.add_argument("--only", action="append", default=[])
    p = sub.add_parser("minimise")
    p.add_argument("target")
    p.add_argument("input")
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    return {"list": _cmd_list, "seeds": _cmd_seeds, "mutate": _cmd_mutate, "atheris": _cmd_atheris,
            "all": _cmd_all, "minimise": _cmd_minimise}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
