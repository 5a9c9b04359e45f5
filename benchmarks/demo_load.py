"""Load test of the demo: concurrent gradio_client sessions against a running medgemma-demo.

    python benchmarks/demo_load.py [--users 1 8 20] [--max-new-tokens 48] [--no-serial]

Starts ``medgemma-demo`` (the embedded Gemma 3 270M) on localhost twice: batched
(``--max-batch 8``) and one at a time (``--max-batch 1``), unless ``--no-serial``; or drives
``--url`` (then only that server). Each user is its own gradio_client session asking one
question through ``/chat``: half type a text question, half upload a QA fixture (its first
question, read by the data plugins). First every question is asked alone (the single-user
answers); then for each user count all users start together, twice: "cold" (the first
time a batch shape is seen, XLA compiles it, inside the measured time) and "warm". Also 8
users asking text questions only (the target: within 1.5x the time of one). Checks: every
request is answered, none lost or mixed (each answer equals its own question's single-user
answer, greedy). Prints one JSON object: p50 / p95 latency and throughput per user count,
pass and server, the ratios, mismatches, and the load average.

Each user's gradio_client session is opened before the users start together (the time is
the questions', not the clients' set-up). Per run also the server's CPU seconds (from
/proc, when this script started it) and its ``batch timing`` log lines summed: batches,
prefill, decode and host seconds, decode steps, the last row's end, the rows that joined a
running batch (``[step, rows]``, continuous batching). ``ratio_8_vs_1_text``
divides by the one user's time for the first question; ``ratio_8_vs_slowest_alone`` by the
slowest of the 8 questions asked alone (a batch lasts as long as its longest answer).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What is a pneumothorax?", "What does an ECG measure?", "What causes type 1 diabetes?",
    "Name a common symptom of pneumonia.", "What is the normal range of adult heart rate?",
    "What is anaemia?", "Which organ produces bile?", "What is a fracture?",
    "What does the thyroid gland do?", "What is hypertension?",
]
QA_FILES = ["medqa_sampled_50.jsonl", "medmcqa_sampled_50.jsonl", "pubmedqa_sampled_50.jsonl",
            "afrimedqa_sampled_50.jsonl"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER_LINES: queue.Queue[str] = queue.Queue()  # the started server's log, as it comes


def start_demo(max_batch: int, max_new: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
           "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    proc = subprocess.Popen([sys.executable, "-m", "medgemma_demo", "--port", str(port),
                             "--max-new-tokens", str(max_new), "--max-batch", str(max_batch),
                             "--queue-size", "256"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = SERVER_LINES
    while not lines.empty():
        lines.get_nowait()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                raise SystemExit("medgemma-demo exited before printing its URL") from None
            continue
        if "running on http" in line:
            return proc, line.split("running on ", 1)[1].split()[0]
    proc.kill()
    raise SystemExit("medgemma-demo did not print its URL within 600 s")


def wait_ready(url: str, timeout: float = 1800) -> float:
    """Ask once (the model loads and compiles in the background); seconds it took."""
    from gradio_client import Client

    start = time.monotonic()
    Client(url, verbose=False).predict("Hello?", api_name="/chat")
    return time.monotonic() - start


def jobs(n: int, fixtures: Path, text_only: bool = False) -> list[tuple[str, str | None]]:
    """n requests: (message, file or None); even ones text, odd ones a QA file upload."""
    out = []
    for k in range(n):
        if text_only:
            out.append((QUESTIONS[k % len(QUESTIONS)], None))
        elif k % 2 == 0:
            out.append((QUESTIONS[(k // 2) % len(QUESTIONS)], None))
        else:
            out.append(("Answer this question.", str(fixtures / "qa" / QA_FILES[(k // 2) % 4])))
    return out


def ask(url: str, job: tuple[str, str | None], client=None) -> tuple[str, float]:
    from gradio_client import Client, handle_file

    client = client or Client(url, verbose=False)  # its own session, as a separate user
    message, file = job
    start = time.monotonic()
    if file is None:
        answer = client.predict(message, api_name="/chat")
    else:
        answer = client.predict(message, file=handle_file(file), api_name="/chat")
    return answer, time.monotonic() - start


def server_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return None


def batch_timings() -> dict:
    """The server's ``batch timing`` lines logged since the last call, summed."""
    rows = []
    while not SERVER_LINES.empty():
        line = SERVER_LINES.get_nowait()
        if "batch timing " in line:
            try:
                rows.append(json.loads(line.split("batch timing ", 1)[1]))
            except ValueError:
                pass
    if not rows:
        return {}
    total = {k: round(sum(r.get(k) or 0 for r in rows), 2)
             for k in ("prefill_s", "decode_s", "host_s", "prompt_s", "total_s", "steps")}
    return {"batches": [r["rows"] for r in rows], **total,
            "tails": sorted({r.get("tail") or r.get("tokens") for r in rows} - {None}),
            "max_wait_s": max(r.get("wait_s", 0) for r in rows),
            "joined": [j for r in rows for j in r.get("joined") or []],
            "row_ends_s": [r.get("row_ends_s") for r in rows][:3]}


def run_users(url: str, n: int, fixtures: Path, reference: dict, text_only: bool = False,
              pid: int | None = None) -> dict:
    from gradio_client import Client

    todo = jobs(n, fixtures, text_only)
    results: list[tuple[str, float] | BaseException | None] = [None] * n
    clients = [Client(url, verbose=False) for _ in range(n)]  # n sessions, set up first
    barrier = threading.Barrier(n + 1)

    def user(k: int) -> None:
        barrier.wait()
        try:
            results[k] = ask(url, todo[k], clients[k])
        except BaseException as exc:  # noqa: BLE001 (counted as unanswered)
            results[k] = exc

    threads = [threading.Thread(target=user, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    batch_timings()  # drop what came before
    cpu0 = server_cpu_s(pid)
    barrier.wait()
    start = time.monotonic()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    cpu1 = server_cpu_s(pid)
    time.sleep(0.2)  # the last batch's timing line
    answered = [r for r in results if isinstance(r, tuple)]
    latencies = sorted(r[1] for r in answered)
    mismatched = [k for k, r in enumerate(results)
                  if isinstance(r, tuple) and r[0] != reference[todo[k]]]
    errors = [f"{type(r).__name__}: {str(r)[:120]}" for r in results
              if isinstance(r, BaseException)]

    def pct(p: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, int(round(p * (len(latencies) - 1))))], 2)

    return {"users": n, "text_only": text_only, "answered": len(answered), "errors": errors[:5],
            "mismatched": mismatched, "wall_s": round(wall, 2), "p50_s": pct(0.5),
            "p95_s": pct(0.95), "throughput_rps": round(len(answered) / wall, 3),
            "server_cpu_s": None if cpu0 is None or cpu1 is None else round(cpu1 - cpu0, 2),
            "server": batch_timings(), "loadavg": os.getloadavg()[0]}


def bench(url: str, users: list[int], fixtures: Path, pid: int | None = None) -> dict:
    ready_s = wait_ready(url)
    log(f"first answer after {ready_s:.0f} s")
    reference, alone = {}, {}
    for job in sorted({j for n in [*users, 8] for t in (False, True)
                       for j in jobs(n, fixtures, t)}, key=str):
        reference[job], alone[job] = ask(url, job)  # alone: the single-user answer
    log(f"{len(reference)} single-user answers")
    out: dict = {"first_answer_s": round(ready_s, 1),
                 "alone_text_s": [round(alone[j], 2) for j in jobs(8, fixtures, True)]}
    for name in ("cold", "warm"):
        runs = [run_users(url, n, fixtures, reference, pid=pid) for n in users]
        runs += [run_users(url, 8, fixtures, reference, text_only=True, pid=pid),
                 run_users(url, 1, fixtures, reference, text_only=True, pid=pid)]
        log(f"{name}: " + ", ".join(f"{r['users']}{'t' if r['text_only'] else ''} users "
                                   f"{r['wall_s']} s" for r in runs))
        out[name] = runs
    by = {(r["users"], r["text_only"]): r for r in out["warm"]}
    if (1, False) in by and (8, False) in by:
        out["ratio_8_vs_1"] = round(by[8, False]["wall_s"] / by[1, False]["wall_s"], 2)
    out["ratio_8_vs_1_text"] = round(by[8, True]["wall_s"] / by[1, True]["wall_s"], 2)
    out["ratio_8_vs_slowest_alone"] = round(by[8, True]["wall_s"] / max(out["alone_text_s"]), 2)
    if by[8, True]["server_cpu_s"] and by[1, True]["server_cpu_s"]:
        out["cpu_ratio_8_vs_1_text"] = round(by[8, True]["server_cpu_s"]
                                             / by[1, True]["server_cpu_s"], 2)
    return out


def log(message: str) -> None:
    print(f"[demo_load {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running demo (default: start one per server kind)")
    p.add_argument("--users", type=int, nargs="+", default=[1, 8, 20])
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--no-serial", action="store_true", help="skip the one-at-a-time server")
    args = p.parse_args()
    fixtures = Path(os.environ.get("MEDGEMMA_FIXTURES", ROOT / "fixtures"))
    out: dict = {"users": args.users, "max_new_tokens": args.max_new_tokens}
    kinds = [("given", None)] if args.url else \
        [("batched", 8)] + ([] if args.no_serial else [("one_at_a_time", 1)])
    for name, max_batch in kinds:
        proc = None
        url = args.url
        if url is None:
            proc, url = start_demo(max_batch, args.max_new_tokens)
        try:
            log(f"{name}: {url}")
            out[name] = bench(url, args.users, fixtures, None if proc is None else proc.pid)
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    out["ok"] = all(r["answered"] == r["users"] and not r["mismatched"]
                    for k, _ in kinds for p in ("cold", "warm") for r in out[k][p])
    out["loadavg"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
