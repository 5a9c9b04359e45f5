"""The Train and Evaluate tabs: ``medgemma-train sft`` and ``medgemma-train eval`` on the loaded
model, each in a background process (one run at a time per server), watched through the
files the run writes.

Train: data (a bundled QA set, or an upload: chat JSONL, a manifest, a zip of files with a
manifest), LoRA rank, steps, learning rate -> a live loss curve, progress, tokens/s, Stop; at
the end the PEFT adapter to download and the fine-tuned model to ask side by side with the
base. Evaluate: a task, a checkpoint (the loaded model or the adapter just trained), N items
-> accuracy with its bootstrap 95% interval, a bar chart of every result so far, the items.
"""

from __future__ import annotations

import json
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from .host import text_engine
from .jobs import Job, JobSlot, read_jsonl, zip_folder
from .uploads import MB, UploadError, unpack_zip

BUNDLED = {"MedQA (50 questions)": "medqa_sampled_50.jsonl",
           "MedMCQA (50)": "medmcqa_sampled_50.jsonl",
           "PubMedQA (50)": "pubmedqa_sampled_50.jsonl",
           "AfriMed-QA (50)": "afrimedqa_sampled_50.jsonl"}
UPLOAD = "Upload my data"
# tokens per training row: the longest bundled row (MedQA, 637 tokens) fits whole
SEQ_LEN = 640
# sequences per step: at 640 tokens, a 20-step LoRA run of the 270M takes minutes on 2 cores
BATCH = 2
TASKS = ("medqa", "medmcqa", "pubmedqa", "afrimedqa", "mmlu_med")
LOADED, TUNED = "loaded model", "fine-tuned (last Train run)"
ONE_RUN = ("One run at a time per server (training or evaluation): a second waits until the "
           "first ends or is stopped.")


class Runs:
    """Where runs go, the one job slot, the last finished training run and the eval results."""

    def __init__(self, folder: str | None, checkpoint: str | None):
        self.root = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="medgemma-runs-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.checkpoint = checkpoint
        self.slot = JobSlot()
        self.train_job: Job | None = None
        self.eval_job: Job | None = None
        self.tuned: Path | None = None        # RUN of the last training run that exported
        self.results: list[dict[str, Any]] = []
        self._tuned_model: tuple[Path, Any] | None = None

    def model_path(self) -> str:
        """The loaded model as a path medgemma-train reads (the embedded default's GGUF)."""
        if self.checkpoint:
            return str(Path(self.checkpoint).resolve())
        from medgemma_core import default_checkpoint

        return str(default_checkpoint())

    def new_folder(self, kind: str) -> Path:
        return self.root / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{len(list(self.root.iterdir()))}"

    def tuned_model(self) -> Any:
        if self.tuned is None:
            raise gr.Error("no fine-tuned model yet: run a training first", print_exception=False)
        if self._tuned_model is None or self._tuned_model[0] != self.tuned:
            from medgemma_core import load

            self._tuned_model = (self.tuned, load(self.tuned / "export" / "hf"))
        return self._tuned_model[1]


def bundled_path(name: str) -> Path:
    return Path(str(resources.files("medgemma_train") / "evals" / "data" / BUNDLED[name]))


def _training_data(choice: str, upload: str | None, folder: Path) -> Path:
    if choice != UPLOAD:
        return bundled_path(choice)
    if not upload:
        raise gr.Error("upload a chat JSONL, a manifest (JSONL/CSV) or a zip of files with a "
                       "manifest, or pick a bundled set", print_exception=False)
    path = Path(upload)
    if path.suffix.lower() != ".zip":
        return path
    try:
        root = unpack_zip(path, folder / "data", max_bytes=1024 * MB)
    except UploadError as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    for name in ("manifest.jsonl", "manifest.csv", "train.jsonl"):
        if (root / name).is_file():
            return root / name
    found = sorted(root.glob("*.jsonl")) + sorted(root.glob("*.csv"))
    if not found:
        raise gr.Error("the zip holds no manifest.jsonl / manifest.csv (one row per example, "
                       "naming its files)", print_exception=False)
    return found[0]


def train_args(checkpoint: str | Path, data: Path, folder: Path, *, steps: float = 20,
               rank: float = 8, lr: float = 2e-4, batch: float = BATCH,
               seq: float = SEQ_LEN, pack: bool = False) -> list[str]:
    """The ``medgemma-train sft`` arguments of a Train-tab run. Rows whose answer does not fit
    in ``seq`` tokens are dropped (``--skip-bad``) and counted in the status line; ``pack``
    (text-only models) fills each ``seq``-token sequence with several short rows."""
    return ["sft", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(folder),
            "--max-steps", str(int(steps)), "--lora-rank", str(int(rank)), "--lr",
            str(float(lr)), "--batch-size", str(int(batch)), "--seq-len", str(int(seq)),
            *(["--pack"] if pack else []), "--skip-bad", "--export", "peft", "--export", "hf",
            "--no-progress", "--set", "run.log_every=1", "--set",
            f"run.save_every={int(steps)}"]


def packs(model: Any) -> bool:
    """Whether a Train-tab run packs rows: a loaded text-only model (image rows never pack)."""
    return text_engine(model)


def skipped_rows(run: Path) -> int:
    """How many rows the run dropped as bad (``bad_rows.jsonl``: e.g. longer than ``seq``)."""
    return len(read_jsonl(run / "bad_rows.jsonl"))


def loss_table(run: Path) -> pd.DataFrame:
    rows = [r for r in read_jsonl(run / "metrics.jsonl")
            if r.get("split", "train") == "train" and r.get("loss") is not None]
    return pd.DataFrame({"step": [int(r["step"]) for r in rows],
                         "loss": [float(r["loss"]) for r in rows]})


def train_status(job: Job | None, steps: int) -> str:
    if job is None:
        return ONE_RUN
    rows = [r for r in read_jsonl(job.folder / "metrics.jsonl") if r.get("split") == "train"]
    last = rows[-1] if rows else {}
    step = int(last.get("step", 0))
    tps = last.get("tokens_per_s")
    parts = [f"step **{step} / {steps}**", f"{job.elapsed:.0f} s"]
    if last.get("loss") is not None:
        parts.append(f"loss {last['loss']:.4f}")
    if tps:
        parts.append(f"{tps:,.0f} tokens/s")
    skipped = skipped_rows(job.folder)
    if skipped:
        parts.append(f"{skipped} row(s) skipped: their answer is past Tokens per row "
                     f"(raise it under More to keep them)")
    if job.running:
        head = "**Training...**" if rows else "**Starting** (loading the model, compiling)..."
    elif job.stopped:
        head = "**Stopped.**"
    elif job.returncode == 0:
        head = "**Done.**"
    else:
        head = f"**Failed:** {job.error_line()}"
    return f"{head} " + " · ".join(parts)


def train_tab(service: Any, config: Any, runs: Runs) -> None:
    gr.Markdown("Fine-tune the loaded model with LoRA (`medgemma-train sft`, in a background "
                f"process). {ONE_RUN}", elem_id="train-intro")
    with gr.Row():
        with gr.Column(scale=1):
            data = gr.Radio([*BUNDLED, UPLOAD], value=next(iter(BUNDLED)), label="Data",
                            elem_id="train-data")
            upload = gr.File(label="Chat JSONL, manifest (JSONL/CSV) or zip with a manifest",
                             file_count="single", elem_id="train-upload")
            rank = gr.Slider(1, 64, value=8, step=1, label="LoRA rank", elem_id="train-rank")
            steps = gr.Slider(1, 500, value=20, step=1, label="Steps", elem_id="train-steps")
            lr = gr.Number(value=2e-4, label="Learning rate", elem_id="train-lr")
            with gr.Accordion("More", open=False):
                batch = gr.Slider(1, 32, value=BATCH, step=1,
                                  label="Batch size (sequences per step; a text model packs "
                                        "several short rows into each)")
                seq = gr.Slider(32, 2048, value=SEQ_LEN, step=32, label="Tokens per row")
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="train-start")
                stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
        with gr.Column(scale=2):
            status = gr.Markdown(ONE_RUN, elem_id="train-status")
            plot = gr.LinePlot(pd.DataFrame({"step": [], "loss": []}), x="step", y="loss",
                               label="Training loss", height=300, elem_id="train-loss")
            download = gr.DownloadButton("Download the PEFT adapter (.zip)", visible=False,
                                         elem_id="train-download")
    with gr.Accordion("Ask the base and the fine-tuned model", open=True):
        gr.Markdown("The fine-tuned model is asked through the chat template it was trained "
                    "with; the base one as in the Chat tab. Greedy decoding.")
        with gr.Row():
            question = gr.Textbox(label="Question", scale=4, elem_id="compare-question")
            ask = gr.Button("Ask both", scale=1, elem_id="compare-ask")
        with gr.Row():
            base_answer = gr.Textbox(label="Base", lines=4, elem_id="compare-base")
            tuned_answer = gr.Textbox(label="Fine-tuned", lines=4, elem_id="compare-tuned")
    timer = gr.Timer(1.0, active=False)

    def on_start(choice, file, rank_, steps_, lr_, batch_, seq_):
        folder = runs.new_folder("train")
        path = _training_data(choice, file, folder)
        args = train_args(runs.model_path(), path, folder, steps=steps_, rank=rank_, lr=lr_,
                          batch=batch_, seq=seq_, pack=packs(service.loader.value))
        try:
            runs.train_job = runs.slot.start("training", args, folder)
        except RuntimeError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        return (train_status(runs.train_job, int(steps_)), loss_table(folder),
                gr.DownloadButton(visible=False), gr.Timer(active=True))

    def on_tick(steps_):
        job = runs.train_job
        if job is None:
            return gr.update(), gr.update(), gr.update(), gr.Timer(active=False)
        running = job.running
        done = gr.DownloadButton(visible=False)
        if not running and job.returncode == 0 and (job.folder / "export" / "peft").is_dir():
            runs.tuned = job.folder
            target = job.folder / "peft-adapter.zip"
            if not target.is_file():
                zip_folder(job.folder / "export" / "peft", target)
            done = gr.DownloadButton(value=str(target), visible=True)
        return (train_status(job, int(steps_)), loss_table(job.folder), done,
                gr.Timer(active=running))

    def on_stop():
        if runs.train_job is not None:
            runs.train_job.stop()

    def on_ask(text: str):
        from .prompting import user_turn

        if not (text or "").strip():
            raise gr.Error("type a question first", print_exception=False)
        from .backends import CoreBackend
        from .prompting import CHAT

        turn = user_turn(text.strip(), [], multimodal=False)
        sampling = service.sampling(0.0)
        base = service.batcher.submit(service.request("", [], turn, 64, sampling)).text(600)
        model = runs.tuned_model()
        request = service.request("", [], turn, 64, sampling)
        if service.mode != CHAT:  # the fine-tuned model answers in the template it learnt
            from .batching import Request
            from .prompting import messages

            request = Request(messages("", [], turn), 64, sampling)
        tuned = "".join(t for chunk in CoreBackend(model, CHAT).run([request]) for t, _ in chunk)
        return base.strip(), tuned.strip()

    start.click(on_start, [data, upload, rank, steps, lr, batch, seq],
                [status, plot, download, timer], concurrency_id="train", concurrency_limit=1,
                api_visibility="private")
    timer.tick(on_tick, steps, [status, plot, download, timer], queue=False,
               api_visibility="private")
    stop.click(on_stop, None, None, queue=False, api_visibility="private")
    ask.click(on_ask, question, [base_answer, tuned_answer], concurrency_id="compare",
              concurrency_limit=1, api_visibility="private")


# ---- Evaluate ---------------------------------------------------------------------------------

def items_table(folder: Path) -> pd.DataFrame:
    rows = []
    for r in read_jsonl(folder / "items.jsonl"):
        if r.get("skipped"):
            continue
        prompt = str(r.get("prompt") or r.get("question") or "")
        q = prompt.rsplit("Question:", 1)[-1].strip() if "Question:" in prompt else prompt
        q = " ".join(q.split())
        rows.append({"id": str(r.get("id")), "question": q if len(q) <= 160 else q[:157] + "...",
                     "answer": str(r.get("parsed") if r.get("parsed") is not None else ""),
                     "gold": str(r.get("gold")), "correct": bool(r.get("correct"))})
    return pd.DataFrame(rows, columns=["id", "question", "answer", "gold", "correct"])


def headline(summary: dict[str, Any]) -> tuple[str, float, float, float]:
    name = summary.get("headline", "accuracy")
    block = summary["metrics"][name]
    lo, hi = block.get("ci95") or (None, None)
    return name, float(block["value"]), float(lo if lo is not None else block["value"]), \
        float(hi if hi is not None else block["value"])


def evaluate_tab(service: Any, config: Any, runs: Runs) -> None:
    gr.Markdown("Measure a checkpoint on a benchmark (`medgemma-train eval`, in a background "
                f"process): accuracy with its bootstrap 95% interval. {ONE_RUN}")
    with gr.Row():
        with gr.Column(scale=1):
            task = gr.Dropdown(list(TASKS), value="medqa", label="Task (its bundled sample)",
                               elem_id="eval-task")
            which = gr.Radio([LOADED, TUNED], value=LOADED, label="Checkpoint",
                             elem_id="eval-checkpoint")
            mode = gr.Radio(["loglik", "generate"], value="loglik", label="Scoring",
                            info="loglik: the option with the highest log-likelihood")
            n = gr.Slider(1, 50, value=10, step=1, label="Items", elem_id="eval-n")
            go = gr.Button("Evaluate", variant="primary", elem_id="eval-start")
        with gr.Column(scale=2):
            status = gr.Markdown(elem_id="eval-status")
            chart = gr.BarPlot(pd.DataFrame({"run": [], "accuracy": []}), x="run", y="accuracy",
                               y_lim=[0, 1], label="Accuracy (all runs so far)", height=260,
                               elem_id="eval-chart")
    table = gr.Dataframe(items_table(Path("/nonexistent")), wrap=True, interactive=False,
                         elem_id="eval-items", label="Items",
                         column_widths=["8%", "62%", "10%", "10%", "10%"])
    timer = gr.Timer(1.0, active=False)
    state = gr.State({})

    def results_frame() -> pd.DataFrame:
        return pd.DataFrame({"run": [r["run"] for r in runs.results],
                             "accuracy": [r["value"] for r in runs.results]})

    def on_go(task_, which_, mode_, n_):
        if which_ == TUNED:
            if runs.tuned is None:
                raise gr.Error("no fine-tuned model yet: run a training in the Train tab first",
                               print_exception=False)
            checkpoint = str(runs.tuned / "export" / "hf")
        else:
            checkpoint = runs.model_path()
        folder = runs.new_folder("eval")
        args = ["eval", task_, "--checkpoint", checkpoint, "--mode", mode_, "--limit",
                str(int(n_)), "--out", str(folder), "--json", "--no-progress"]
        try:
            runs.eval_job = runs.slot.start("evaluation", args, folder)
        except RuntimeError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        label = f"{task_} · {'fine-tuned' if which_ == TUNED else 'base'} · {mode_}"
        return (f"**Starting** {label} on {int(n_)} items...", gr.Timer(active=True),
                {"label": label, "n": int(n_)})

    def on_tick(info):
        job = runs.eval_job
        if job is None or not info:
            return gr.update(), gr.update(), gr.update(), gr.Timer(active=False)
        done = len(items_table(job.folder))
        if job.running:
            return (f"**Evaluating** {info['label']}: {done} / {info['n']} items, "
                    f"{job.elapsed:.0f} s", gr.update(), items_table(job.folder),
                    gr.Timer(active=True))
        summary_file = job.folder / "summary.json"
        if job.returncode != 0 or not summary_file.is_file():
            return (f"**Failed:** {job.error_line()}", gr.update(), items_table(job.folder),
                    gr.Timer(active=False))
        name, value, lo, hi = headline(json.loads(summary_file.read_text()))
        if not any(r["folder"] == job.folder for r in runs.results):
            runs.results.append({"run": info["label"], "value": value, "lo": lo, "hi": hi,
                                 "folder": job.folder})
        return (f"**{info['label']}**: {name} **{value:.3f}** (95% CI {lo:.3f}-{hi:.3f}) on "
                f"{done} items, {job.elapsed:.0f} s", results_frame(), items_table(job.folder),
                gr.Timer(active=False))

    go.click(on_go, [task, which, mode, n], [status, timer, state], concurrency_id="train",
             concurrency_limit=1, api_visibility="private")
    timer.tick(on_tick, state, [status, chart, table, timer], queue=False,
               api_visibility="private")
