"""One driver for the monorepo.

Every package under ``packages/`` gets a session of its own name that builds a
venv holding only that package, its declared dependencies (sibling packages of
this repo installed from their folders) and its ``test`` extra, then runs its
tests. ``cross`` installs everything together and runs ``tests/`` at the root.

    nox                 # the default test run (what CI runs)
    nox -s demo         # set up and launch the demo app
    nox -s slow         # the slow tests (real-size checkpoints, long runs)
    nox -s lint         # ruff
    nox -s fuzz         # fuzz every reader of untrusted files (not in the default run)

Sessions run on the interpreter nox runs under when it is Python 3.11 or later, else on the
first of ``python3.11``, ``python3.12``, ``python3.13`` found on ``PATH``. None found is an error
(exit 1), never a skip. ``nox --force-python 3.12`` picks one.

Installs print pip's own output and a step counter (``[2/4] installing medgemma-core``).

Each venv holds its own jax and torch (1.3 to 2.4 GB). With
``MEDGEMMA_NOX_PRUNE=1`` (what ``.ci/run`` sets) a test session deletes its venv
when it ends, pass or fail, so a full run needs one venv's disk at a time.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import sys
from pathlib import Path

import nox

try:
    import tomllib
except ModuleNotFoundError:  # nox itself runs under Python 3.10 (nox depends on tomli there)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent
PACKAGES = ROOT / "packages"
SUPPORTED = ("3.11", "3.12", "3.13")


def _python() -> str | None:
    """The sessions' interpreter: ``None`` (nox's own) when nox runs under 3.11 or later, else
    the first of ``SUPPORTED`` on ``PATH``, else ``"3.11"``, which nox then reports as not found."""
    if sys.version_info >= (3, 11):  # noqa: UP036 - nox itself may run under 3.10
        return None
    found = next((v for v in SUPPORTED if shutil.which(f"python{v}")), None)
    if found is None:
        print(f"noxfile: nox runs under Python {sys.version.split()[0]} and none of python"
              f"{', python'.join(SUPPORTED)} is on PATH; install Python 3.11 or later "
              "(or run nox under one: python3.12 -m nox)", file=sys.stderr)
    return found or SUPPORTED[0]


PYTHON = _python()

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
# A missing interpreter fails the run: a skip would exit 0 with no test run.
nox.options.error_on_missing_interpreters = True
nox.options.download_python = "never"
# Reuse a venv only if it was made by the interpreter chosen now (nox skips this check by default).
os.environ.setdefault("NOX_ENABLE_STALENESS_CHECK", "1")


def _pruned(func):
    """Delete the session's venv when it ends, if ``MEDGEMMA_NOX_PRUNE=1``."""

    @functools.wraps(func)
    def wrapper(session: nox.Session) -> None:
        try:
            func(session)
        finally:
            location = getattr(session.virtualenv, "location", None)
            if os.environ.get("MEDGEMMA_NOX_PRUNE") == "1" and location:
                shutil.rmtree(location, ignore_errors=True)

    return wrapper


def _packages() -> dict[str, Path]:
    """Distribution name -> folder, for every package in the repo."""
    found = {}
    for pyproject in sorted(PACKAGES.glob("*/pyproject.toml")):
        name = tomllib.loads(pyproject.read_text())["project"]["name"]
        found[name] = pyproject.parent
    return found


def _meta(dist: str) -> dict:
    """The ``[project]`` table of ``dist``'s pyproject.toml."""
    return tomllib.loads((_packages()[dist] / "pyproject.toml").read_text())["project"]


def _req_name(req: str) -> str:
    return re.split(r"[ <>=!~;\[]", req, maxsplit=1)[0].strip().lower()


def _local_deps(dist: str, seen: list[str] | None = None) -> list[str]:
    """Sibling packages ``dist`` depends on, dependencies first."""
    seen = [] if seen is None else seen
    for req in _meta(dist).get("dependencies", []):
        name = _req_name(req)
        if name in _packages() and name not in seen:
            _local_deps(name, seen)
            seen.append(name)
    return seen


# pytest keeps the temporary folders of failed tests only (checkpoints written by tests are GBs)
PYTEST = ("pytest", "-o", "tmp_path_retention_policy=failed")


def _env() -> dict[str, str]:
    return {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "JAX_PLATFORMS": "cpu",
        "PYTHONHASHSEED": "0",
        # caches kept beside the venvs: reruns skip GGUF dequantization and XLA compiles
        "MEDGEMMA_CONVERT_CACHE": str(ROOT / ".nox" / "_cache" / "converted"),
        "MEDGEMMA_JAX_CACHE": str(ROOT / ".nox" / "_cache" / "jax"),
    }


def _steps(session: nox.Session, steps: list[tuple[str, list[str]]]) -> None:
    """``pip install`` each ``(label, args)`` in turn, with a step counter and pip's own output
    (what it downloads and builds), so that a long install is never a silent wait."""
    for k, (label, args) in enumerate(steps, 1):
        session.log(f"[{k}/{len(steps)}] installing {label}")
        session.install(*args, silent=False)


def _wants_torch(dists: list[str], extra: str | None) -> bool:
    """Whether installing ``dists`` (with ``extra``) and their sibling dependencies pulls torch."""
    reqs = [r for d in dists for r in _meta(d).get("optional-dependencies", {}).get(extra, [])]
    reqs += [r for d in {*dists, *(x for d in dists for x in _local_deps(d))}
             for r in _meta(d).get("dependencies", [])]
    return any(_req_name(r) == "torch" for r in reqs)


def _install(session: nox.Session, dists: list[str], extra: str | None = "test") -> None:
    # torch comes from the CPU wheel on disk; pin it before anything can pull a CUDA build.
    # Sessions whose packages do not need it (medgemma-data, examples) do without.
    steps = [("torch (CPU wheel)", ["torch==2.13.0"])] if _wants_torch(dists, extra) else []
    for dist in dists:
        for dep in _local_deps(dist):
            if all(label != dep for label, _ in steps):
                steps.append((dep, ["-e", str(_packages()[dep])]))
    for dist in dists:
        spec = f"{_packages()[dist]}[{extra}]" if extra else str(_packages()[dist])
        steps.append((f"{dist}[{extra}]" if extra else dist, ["-e", spec]))
    _steps(session, steps)


def _make_package_session(dist: str) -> None:
    @nox.session(name=dist, python=PYTHON)
    @_pruned
    def _tests(session: nox.Session) -> None:
        _install(session, [dist])
        folder = _packages()[dist]
        session.run(*PYTEST, str(folder / "tests"), *session.posargs, env=_env())

    _tests.__doc__ = f"Tests of {dist}, in a venv holding only it and what it declares."


for _dist in _packages():
    _make_package_session(_dist)


@nox.session(python=PYTHON)
@_pruned
def cross(session: nox.Session) -> None:
    """Cross-package tests: every package installed together."""
    _install(session, list(_packages()))
    if any((ROOT / "tests").glob("test_*.py")):
        session.run(*PYTEST, str(ROOT / "tests"), *session.posargs, env=_env())
    else:
        session.log("no cross-package tests yet")


@nox.session(python=PYTHON)
@_pruned
def examples(session: nox.Session) -> None:
    """The example third-party plugin, installed beside medgemma-data and tested with its kit."""
    _install(session, ["medgemma-data"])
    example = ROOT / "examples" / "medgemma-ultrasound"
    _steps(session, [("medgemma-ultrasound[test]", ["-e", f"{example}[test]"])])
    session.run(*PYTEST, str(example / "tests"), *session.posargs, env=_env())


@nox.session(python=PYTHON, default=False)
def slow(session: nox.Session) -> None:
    """The slow tests of every package (real-size checkpoints, training runs)."""
    _install(session, list(_packages()))
    # One pytest per folder: the packages' test modules share basenames (test_tokenizer.py),
    # and each folder has its own conftest and markers. Exit code 5: no slow test there.
    folders = [p / "tests" for p in _packages().values()] + [ROOT / "tests"]
    for folder in folders:
        session.run(*PYTEST, "-m", "slow", str(folder), *session.posargs, env=_env(),
                    success_codes=[0, 5])


@nox.session(python=PYTHON)
@_pruned
def lint(session: nox.Session) -> None:
    """ruff over every package, the benchmarks and this file."""
    _steps(session, [("ruff", ["ruff>=0.6"])])
    session.run("ruff", "check", "packages", "examples", "benchmarks", "tests", "noxfile.py")


@nox.session(python=PYTHON, default=False)
def fuzz(session: nox.Session) -> None:
    """Fuzz every reader of untrusted files (fuzz/README.md): >= 10,000 inputs per target,
    coverage-guided with atheris where it installs, else the seeded mutator. Arguments go to
    ``python -m fuzz all`` (``nox -s fuzz -- --only data --runs 20000``)."""
    # the packages whose readers fuzz/ targets (and what they declare), without test extras
    _install(session, ["medgemma-data", "medgemma-demo", "medgemma-core", "medsiglip"],
             extra=None)
    try:
        session.install("atheris", silent=False)
    except nox.command.CommandFailed:
        session.warn("atheris does not install on this interpreter; fuzzing with the seeded "
                     "mutator instead (python -m fuzz all --engine mutate)")
    session.run("python", "-m", "fuzz", "all", "--runs", "10000", *session.posargs, env=_env())


@nox.session(python=PYTHON, default=False)
def demo(session: nox.Session) -> None:
    """Set up and launch the demo (the README's first command); it prints the local URL."""
    import hashlib

    dists = [*_local_deps("medgemma-demo"), "medgemma-demo"]
    # Editable installs follow code edits; reinstall only when a pyproject.toml changed.
    key = hashlib.sha256(b"".join((_packages()[d] / "pyproject.toml").read_bytes()
                                  for d in dists)).hexdigest()
    stamp = Path(session.virtualenv.location) / ".medgemma-demo-installed"
    if not (stamp.is_file() and stamp.read_text() == key):
        _steps(session, [(d, ["-e", str(_packages()[d])]) for d in dists])
        stamp.write_text(key)
    else:
        session.log(f"installed already: {', '.join(dists)} (editable; a pyproject.toml change "
                    "reinstalls)")
    session.run("medgemma-demo", *session.posargs, env=_env())


@nox.session(python=PYTHON)
@_pruned
def browser(session: nox.Session) -> None:
    """The demo in a real headless Chromium (Playwright drives the system's chromium)."""
    import os
    import shutil

    if not (os.environ.get("CHROMIUM") or shutil.which("chromium")):
        session.error("the browser test needs Chromium: apt-get install -y chromium "
                      "(or set CHROMIUM to its path)")
    folder = _packages()["medgemma-demo"]
    _steps(session, [*[(dep, ["-e", str(_packages()[dep])]) for dep in _local_deps("medgemma-demo")],
                     ("medgemma-demo[browser]", ["-e", f"{folder}[browser]"])])
    session.run(*PYTEST, "-m", "browser", "-s", str(folder / "tests" / "test_browser.py"),
                *session.posargs, env=_env())

