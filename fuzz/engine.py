"""The fuzzing engine: targets, the contract, a seeded mutator, a watchdog, a minimiser.

A :class:`Target` feeds one input (bytes, written to a file) to one reader of untrusted files
and checks what comes back. The contract, the same for every target:

* the reader returns a valid result (``check`` passes), or raises one of the target's
  documented error classes (``errors``);
* any other exception is a finding, and so is a ``check`` failure (:class:`ContractViolation`);
* so is one input that runs over :data:`TIME_LIMIT_S` seconds, or the process going over
  :data:`RSS_LIMIT_MB` of resident memory (the :class:`Watchdog` ends the process, since
  neither can be interrupted from Python when it happens inside a C decoder).

Two engines drive targets: atheris (coverage-guided libFuzzer, :mod:`fuzz.atheris_driver`) and
the deterministic mutator here (:func:`mutation_run`), which needs nothing installed and is what
the smoke tests of the default CI run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

TIME_LIMIT_S = 5.0
RSS_LIMIT_MB = 2048
#: Exit status of a process the watchdog ended (a hang or a memory blow-up).
WATCHDOG_EXIT = 70


class ContractViolation(AssertionError):
    """The reader returned, but what it returned breaks the target's contract."""


@dataclass(frozen=True)
class Target:
    """One reader under test.

    ``run(data, folder)`` writes ``data`` where the reader wants it (inside ``folder``, a fresh
    empty folder per input), calls the reader through its public function and checks the
    result, raising :class:`ContractViolation` when it is wrong. ``errors()`` gives the
    documented error classes (imported lazily). ``seeds(folder)`` gives the seed inputs.
    ``instrument``: the module names atheris instruments for coverage.
    """

    name: str
    package: str
    run: Callable[[bytes, Path], None]
    errors: Callable[[], tuple[type[BaseException], ...]]
    seeds: Callable[[Path], list[bytes]]
    instrument: tuple[str, ...] = ()
    doc: str = ""


@dataclass
class Finding:
    """One input outside the contract."""

    target: str
    kind: str            # "exception", "contract", "timeout", "rss"
    signature: str       # exception type and innermost frame: the same bug, the same signature
    message: str
    input_sha1: str
    path: str = ""

    def as_dict(self) -> dict[str, str]:
        return dict(self.__dict__)


def signature_of(exc: BaseException) -> str:
    """``Type@file:line`` of the innermost frame of the first cause (an error wrapped by
    ``raise ... from exc`` is named by what it wraps): findings with one cause share it."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    tb = traceback.extract_tb(exc.__traceback__)
    where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "?"
    return f"{type(exc).__name__}@{where}"


def execute(target: Target, data: bytes, folder: Path,
            errors: tuple[type[BaseException], ...]) -> Finding | None:
    """Run one input; ``None`` when it kept the contract, else the finding (not raised)."""
    return outcome(target, data, folder, errors)[1]


def outcome(target: Target, data: bytes, folder: Path,
            errors: tuple[type[BaseException], ...]) -> tuple[str, Finding | None]:
    """Run one input: ``("ok", None)`` for a valid result, ``("ErrorClass", None)`` for a
    documented error, ``("finding", finding)`` otherwise."""
    try:
        target.run(data, folder)
    except errors as exc:
        return type(exc).__name__, None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a pyo3 PanicException is a BaseException
        kind = "contract" if isinstance(exc, ContractViolation) else "exception"
        message = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
        return "finding", Finding(target.name, kind, signature_of(exc), message,
                                  hashlib.sha1(data).hexdigest())
    return "ok", None


def seed_outcomes(target: Target, work: Path) -> list[str]:
    """What each seed gives as it is (``ok``, a documented error's class, ``finding``)."""
    errors = target.errors()
    (work / "seeds").mkdir(parents=True, exist_ok=True)
    out = []
    for k, data in enumerate(target.seeds(work / "seeds")):
        folder = work / f"seed{k}"
        folder.mkdir()
        out.append(outcome(target, data, folder, errors)[0])
        _rmtree(folder)
    return out


def rss_mb() -> float:
    """Resident memory of this process now, in MiB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (``VmHWM``: ``ru_maxrss`` would
    include the parent's memory at the fork before this process's exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Watchdog:
    """A thread that ends the process when one input runs too long or memory grows too much.

    Before exiting it writes ``report`` (JSON: the target, the kind, the input's file), so the
    caller of the process sees which input did it; the input itself is already on disk.
    """

    def __init__(self, report: Path, target: str, time_limit: float = TIME_LIMIT_S,
                 rss_limit_mb: float = RSS_LIMIT_MB) -> None:
        self.report, self.target = report, target
        self.time_limit, self.rss_limit_mb = time_limit, rss_limit_mb
        self._started: float | None = None
        self._input: Path | None = None
        threading.Thread(target=self._watch, daemon=True).start()

    def begin(self, input_path: Path) -> None:
        self._input, self._started = input_path, time.monotonic()

    def end(self) -> None:
        self._started = None

    def _trip(self, kind: str, message: str) -> None:
        data = self._input.read_bytes() if self._input and self._input.is_file() else b""
        finding = Finding(self.target, kind, kind, message, hashlib.sha1(data).hexdigest(),
                          str(self._input or ""))
        self.report.write_text(json.dumps({"findings": [finding.as_dict()], "tripped": kind}))
        print(f"fuzz: {self.target}: {message}; input {self._input}", file=sys.stderr,
              flush=True)
        os._exit(WATCHDOG_EXIT)

    def _watch(self) -> None:
        while True:
            time.sleep(0.05)
            started = self._started
            if started is not None and time.monotonic() - started > self.time_limit:
                self._trip("timeout", f"one input ran over {self.time_limit:g} s")
            rss = rss_mb()
            if rss > self.rss_limit_mb:
                self._trip("rss", f"resident memory reached {rss:.0f} MiB "
                                  f"(limit {self.rss_limit_mb:g} MiB)")


# ---- the mutator ---------------------------------------------------------------------------

_INTERESTING_INTS = (0, 1, 2, 7, 8, 15, 16, 127, 128, 255, 256, 1023, 1024, 4096, 32767, 32768,
                     65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 10**5, 10**9, 10**12, 2**63 - 1,
                     2**64 - 1)
_INTERESTING_TEXT = (b"0", b"-1", b"1", b"65535", b"100000", b"99999999999999999999",
                     b"1e308", b"-1e308", b"NaN", b"null", b"true", b"\"\"", b"[]", b"{}",
                     b"\\ud800", b"\xff\xfe", b"\xc3\x28", b"\x00")
_TOKENS = (b"\"", b"{", b"}", b"[", b"]", b",", b":", b"\\", b"\n", b"\x00", b"\xff",
           b"DICM", b"PK\x03\x04", b"\x89PNG")


def _pos(rng: random.Random, n: int) -> int:
    """A position in ``0..n``, half the time among the first 512 bytes (headers live there)."""
    if n <= 0:
        return 0
    if rng.random() < 0.5:
        return rng.randrange(min(n, 512) + 1)
    return rng.randrange(n + 1)


def mutate(rng: random.Random, data: bytes, corpus: Sequence[bytes],
           max_len: int = 1 << 20) -> bytes:
    """1 to 8 random edits of ``data``: bit flips, interesting integers and numbers, deleted,
    repeated and inserted chunks, truncation, splices with another corpus entry."""
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4, 8))):
        n = len(b)
        op = rng.randrange(12)
        if op == 0 and n:                                   # flip a bit
            i = _pos(rng, n - 1)
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:                                 # random byte
            b[_pos(rng, n - 1)] = rng.randrange(256)
        elif op == 2 and n:                                 # interesting byte
            b[_pos(rng, n - 1)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))
        elif op == 3 and n >= 2:                            # interesting integer, LE or BE
            width = rng.choice((2, 4, 8))
            value = rng.choice(_INTERESTING_INTS) % (1 << (8 * width))
            raw = value.to_bytes(width, rng.choice(("little", "big")))
            i = _pos(rng, max(0, n - width))
            b[i:i + width] = raw
        elif op == 4 and n > 1:                             # delete a chunk
            i = _pos(rng, n - 1)
            del b[i:i + rng.randint(1, max(1, n // 4))]
        elif op == 5 and n:                                 # repeat a chunk
            i = _pos(rng, n - 1)
            chunk = b[i:i + rng.randint(1, min(n, 256))]
            j = _pos(rng, n)
            b[j:j] = chunk * rng.choice((1, 1, 2, 16))
        elif op == 6:                                       # insert random bytes
            j = _pos(rng, n)
            b[j:j] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 7 and n > 1:                             # truncate
            del b[rng.randrange(1, n):]
        elif op == 8 and corpus:                            # splice with another entry
            other = rng.choice(corpus)
            b = b[:_pos(rng, n)] + other[_pos(rng, len(other)):]
        elif op == 9 and corpus and n:                      # overwrite with another's chunk
            other = rng.choice(corpus)
            if other:
                i = rng.randrange(len(other))
                chunk = other[i:i + rng.randint(1, 64)]
                j = _pos(rng, n - 1)
                b[j:j + len(chunk)] = chunk
        elif op == 10 and n:                                # replace a number in text
            digits = [i for i in range(min(n, 1 << 16)) if 48 <= b[i] <= 57]
            if digits:
                i = rng.choice(digits)
                k = i
                while k < n and 48 <= b[k] <= 57:
                    k += 1
                b[i:k] = rng.choice(_INTERESTING_TEXT)
        elif op == 11:                                      # insert a token
            j = _pos(rng, n)
            b[j:j] = rng.choice(_TOKENS)
    return bytes(b[:max_len])


# ---- the mutation run ----------------------------------------------------------------------

@dataclass
class RunStats:
    target: str
    engine: str
    executions: int = 0
    seconds: float = 0.0
    slowest_s: float = 0.0
    peak_rss_mb: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    #: what each seed gave unmutated: "ok", a documented error's class, or "finding"
    seed_outcomes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["findings"] = [f.as_dict() for f in self.findings]
        return d


def mutation_run(target: Target, *, runs: int, seed: int, work: Path, out: Path,
                 extra_seeds: Sequence[bytes] = (), max_seconds: float | None = None,
                 watchdog: Watchdog | None = None) -> RunStats:
    """``runs`` inputs through ``target``: first every seed as is, then mutants of them.

    Findings are saved under ``out`` (``<sha1>.bin``, one per signature) and returned.
    """
    errors = target.errors()
    seeds_dir = work / "seeds"
    seeds_dir.mkdir(parents=True, exist_ok=True)
    corpus = [*target.seeds(seeds_dir), *extra_seeds]
    if not corpus:
        raise RuntimeError(f"target {target.name} has no seeds")
    rng = random.Random(f"{target.name}:{seed}")
    stats = RunStats(target.name, "mutate")
    seen: set[str] = set()
    if watchdog:  # a target's first call imports and compiles: not any input's own time
        (work / "warmup").mkdir()
        outcome(target, corpus[0], work / "warmup", errors)
    start = time.monotonic()
    for i in range(runs):
        data = corpus[i] if i < len(corpus) else mutate(rng, rng.choice(corpus), corpus)
        folder = work / f"in{i}"
        folder.mkdir()
        keep = work / f"in{i}.bin"
        keep.write_bytes(data)  # the watchdog reports this file when it trips
        if watchdog:
            watchdog.begin(keep)
        t0 = time.monotonic()
        result, finding = outcome(target, data, folder, errors)
        dt = time.monotonic() - t0
        if i < len(corpus):
            stats.seed_outcomes.append(result)
        if watchdog:
            watchdog.end()
        stats.executions += 1
        stats.slowest_s = max(stats.slowest_s, dt)
        if finding is not None and finding.signature not in seen:
            seen.add(finding.signature)
            out.mkdir(parents=True, exist_ok=True)
            saved = out / f"{finding.input_sha1}.bin"
            saved.write_bytes(data)
            finding.path = str(saved)
            stats.findings.append(finding)
            print(f"fuzz: {target.name}: finding {finding.signature}: {finding.message}"
                  f" ({saved})", file=sys.stderr, flush=True)
        _rmtree(folder)
        keep.unlink()
        if max_seconds is not None and time.monotonic() - start > max_seconds:
            break
    stats.seconds = time.monotonic() - start
    stats.peak_rss_mb = peak_rss_mb()
    return stats


def _rmtree(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def minimise(target: Target, data: bytes, work: Path, *, attempts: int = 2000) -> bytes:
    """A smaller input with the same finding signature (chunk removal, halving sizes)."""
    errors = target.errors()
    counter = iter(range(10**9))

    def sig(candidate: bytes) -> str | None:
        folder = work / f"min{next(counter)}"
        folder.mkdir(parents=True)
        try:
            f = execute(target, candidate, folder, errors)
        finally:
            _rmtree(folder)
        return f.signature if f else None

    want = sig(data)
    if want is None:
        raise ValueError("the input does not fail: nothing to minimise")
    best, chunk, tries = data, max(1, len(data) // 2), 0
    while chunk >= 1 and tries < attempts:
        i, shrunk = 0, False
        while i < len(best) and tries < attempts:
            candidate = best[:i] + best[i + chunk:]
            tries += 1
            if candidate and sig(candidate) == want:
                best, shrunk = candidate, True
            else:
                i += chunk
        if not shrunk:
            chunk //= 2
    return best
