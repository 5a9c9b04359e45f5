"""The page: Chat, Train, Evaluate, MedSigLIP zero-shot and Plugins tabs, and ``/chat``.

    from medgemma_demo import DemoConfig, build_app
    app = build_app(DemoConfig(checkpoint=None))      # the embedded Gemma 3 270M
    app.launch(**launch_kwargs(config))

``build_app`` starts loading the model in a background thread and returns at once; the page
shows the loading state and queues questions until the model is ready.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from .chat import AUTO, MAX_NEW_TOKENS, ChatService
from .host import ChatModel, Loader, one_line
from .plugins import plugin_table, problems_markdown
from .presets import PRESETS, preset
from .uploads import options_markdown
from .workbench import Runs, evaluate_tab, train_tab
from .zeroshot import DEFAULT_LABELS, ZeroShotModel, classify, no_checkpoint, parse_labels

log = logging.getLogger("medgemma_demo")

TITLE = "MedGemma demo (JAX / Flax)"

NOTICE = (
    "⚠ **Research use only. Not for clinical decisions.** Answers can be wrong or invented. "
    "Do not upload identifiable patient data to a shared server. MedGemma and Gemma weights "
    "are subject to their own terms of use.")

def default_model_note(command: str) -> str:
    return (
        "You are running the **embedded default model: Gemma 3 270M**, a small *text-only "
        "base* model. It is **not** a medical model and it cannot see images: it is here so "
        "the app works out of the box. It is prompted as a base model (a short \"Question: ... "
        "Answer:\" frame, repetition control on). For MedGemma, download "
        "`google/medgemma-4b-it` (or -27b) from Hugging Face and start "
        f"`{command} --checkpoint path/to/medgemma-4b-it`.")


def launch_command() -> str:
    """How the user started the demo, for hints: ``nox -s demo --`` under nox, the
    ``medgemma-demo`` command when it is on PATH, else the path or ``python -m medgemma_demo``."""
    if os.environ.get("NOX_CURRENT_SESSION") == "demo":
        return "nox -s demo --"
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == "medgemma-demo":
        on_path = shutil.which("medgemma-demo")
        if on_path and Path(on_path).resolve() == argv0.resolve():
            return "medgemma-demo"
        return str(argv0)
    if argv0 is not None and argv0.name == "__main__.py":
        return "python -m medgemma_demo"
    return "medgemma-demo"

CSS = """
#notice {border: 2px solid #d97706; border-radius: 8px; padding: 4px 12px; background: #fffbeb;}
#notice p {color: #78350f;}
"""


@dataclass(frozen=True)
class DemoConfig:
    """What the command line sets. ``checkpoint``: None for the embedded default model;
    ``medsiglip``: a MedSigLIP folder or None; ``max_upload_mb``: per-file upload limit;
    ``max_new_tokens``: the slider's start value; ``warmup``: compile the first generation
    while loading; ``queue_size``: waiting requests beyond which new ones are refused;
    ``max_batch``: questions decoded together; ``batch_window_ms``: how long the first
    question of a batch waits for others; ``prompt_mode``: auto, chat or base; ``command``:
    how the demo was started (None: found out, :func:`launch_command`); ``runs_dir``: where
    Train and Evaluate runs go (None: a temporary folder)."""

    checkpoint: str | None = None
    medsiglip: str | None = None
    max_upload_mb: int = 1024
    max_new_tokens: int = 128
    warmup: bool = True
    queue_size: int = 64
    max_batch: int = 8
    batch_window_ms: int = 250
    prompt_mode: str = "auto"
    command: str | None = None
    runs_dir: str | None = None


def default_loader(config: DemoConfig) -> Loader[ChatModel]:
    """Load ``config.checkpoint`` (None: the embedded default) with medgemma-core."""

    def load() -> ChatModel:
        from medgemma_core import load as core_load

        return core_load(config.checkpoint)

    def warmup(model: ChatModel) -> None:
        # One short answer, the shape of a first question: the first user waits less.
        from .backends import CoreBackend
        from .chat import ChatService
        from .prompting import user_turn

        service = ChatService(Loader.ready(model), checkpoint=config.checkpoint,
                              prompt_mode=config.prompt_mode)
        turn = user_turn("What is a pneumothorax?", [], multimodal=model.is_multimodal)
        request = service.request("", [], turn, config.max_new_tokens, service.sampling(0.0))
        backend = CoreBackend(model, service.mode or "chat", max_batch=config.max_batch)
        backend.warm(request)  # every batch shape the batcher uses, and the shrinks

    return Loader(load, warmup=warmup if config.warmup else None, what="model")


def _first_image(service: ChatService, file: str | None) -> np.ndarray:
    loaded = service.load_files(file)
    images = [img for s in loaded.samples for img in s.images]
    if not images:
        raise gr.Error("that file holds no image; upload an image, a DICOM or a slide",
                       print_exception=False)
    return images[0]


def _chat_tab(service: ChatService, config: DemoConfig) -> None:
    display = gr.State([])   # what the chat shows (role, markdown)
    history = gr.State([])   # the model's past turns (images included), sent each turn
    pending = gr.State([])   # samples attached for the next question
    sent = gr.State([])      # the samples that went with the question being answered
    question = gr.State("")
    with gr.Row():
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=460,
                                 feedback_options=None, buttons=["copy"])
            with gr.Row():
                text = gr.Textbox(placeholder="Ask a question, attach a file on the right...",
                                  show_label=False, lines=2, scale=5, elem_id="chat-input")
                with gr.Column(scale=1, min_width=120):
                    send = gr.Button("Send", variant="primary", elem_id="send-btn")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop-btn")
                    clear = gr.Button("Clear", elem_id="clear-btn")
            with gr.Accordion("Settings", open=False):
                system = gr.Textbox(label="System prompt", lines=2,
                                    value="You are a helpful medical assistant.")
                max_new = gr.Slider(1, MAX_NEW_TOKENS, value=config.max_new_tokens, step=1,
                                    label="Max new tokens", elem_id="max-new")
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05,
                                        label="Temperature (0 = greedy)")
                penalty = gr.Slider(1.0, 2.0, value=lambda: service.repetition_defaults()[0],
                                    step=0.05, label="Repetition penalty (1 = off)",
                                    info="as transformers' repetition_penalty, over the answer")
                ngram = gr.Slider(0, 8, value=lambda: service.repetition_defaults()[1], step=1,
                                  label="No-repeat n-gram size (0 = off)")
        with gr.Column(scale=2):
            task = gr.Dropdown([p.name for p in PRESETS], value=None, label="Task preset",
                               info="Fills the system prompt and the question")
            expects = gr.Markdown()
            files = gr.File(label="Upload: PNG/JPEG, DICOM, zipped CT/MRI series, slide, "
                                  "FHIR JSON", file_count="multiple", elem_id="upload")
            read_as = gr.Dropdown([AUTO, *plugin_table()["modality"]], value=AUTO,
                                  label="Read as", elem_id="read-as",
                                  info="auto: the data plugins detect the modality")
            with gr.Accordion("Read options", open=False, elem_id="read-options-box"):
                read_opts = gr.Textbox(label="Read options (key=value, comma-separated; Enter "
                                             "reads the upload again)", lines=1, max_lines=1,
                                       placeholder="min_tissue=0.1, windows=serving",
                                       elem_id="read-options")
                opts_help = gr.Markdown(options_markdown(None), elem_id="read-options-help")
            upload_status = gr.Markdown(elem_id="upload-status")
            gallery = gr.Gallery(label="What the model sees", columns=3, height=360,
                                 elem_id="gallery", format="png", interactive=False)

    def on_preset(name: str | None):
        if not name:
            return gr.update(), gr.update(), ""
        p = preset(name)
        return p.system, p.prompt, f"Attach: {p.expects}."

    task.change(on_preset, task, [system, text, expects], queue=False, api_visibility="private")
    upload_io = dict(fn=service.upload, inputs=[files, read_as, read_opts],
                     outputs=[gallery, upload_status, pending], concurrency_id="uploads",
                     concurrency_limit=2, api_visibility="private")
    files.upload(**upload_io)
    read_as.change(**upload_io)
    read_opts.submit(**upload_io)
    read_as.change(options_markdown, read_as, opts_help, queue=False, api_visibility="private")
    files.clear(lambda: ([], "", []), None, [gallery, upload_status, pending], queue=False,
                api_visibility="private")

    def submit(text_, display_, pending_, request: gr.Request):
        out = service.submit(text_, display_, pending_, request)
        return (*out, [])  # nothing attached for the next question

    submit_args = dict(fn=submit, inputs=[text, display, pending],
                       outputs=[text, chatbot, display, question, sent, files, gallery,
                                upload_status, pending], queue=False, api_visibility="private")
    # Many users' answers stream at once: the batcher decodes them together.
    respond_args = dict(fn=service.respond,
                        inputs=[question, display, history, sent, system, max_new, temperature,
                                penalty, ngram],
                        outputs=[chatbot, display, history], concurrency_id="model",
                        concurrency_limit=2 * config.max_batch, api_visibility="undocumented")
    for trigger in (send.click, text.submit):
        trigger(**submit_args).success(**respond_args)
    stop.click(service.request_stop, None, None, queue=False, api_visibility="private")

    def reset():
        return [], [], [], [], "", None, "", []

    cleared = [chatbot, display, history, pending, upload_status, files, text, gallery]
    clear.click(reset, None, cleared, queue=False, api_visibility="private")
    chatbot.clear(reset, None, cleared, queue=False, api_visibility="private")


def _zero_shot_tab(service: ChatService, siglip: Loader[ZeroShotModel] | None,
                   command: str = "medgemma-demo") -> None:
    if siglip is None:
        gr.Markdown(no_checkpoint(command), elem_id="medsiglip-missing")
    else:
        gr.Markdown("Zero-shot classification with MedSigLIP: each label is scored "
                    "independently (sigmoid), so the probabilities need not sum to one.")
    with gr.Row():
        with gr.Column():
            image_file = gr.File(label="Image (PNG/JPEG, DICOM, slide)", file_count="single",
                                 interactive=siglip is not None)
            labels = gr.Textbox(label="Labels, one per line", lines=5,
                                value="\n".join(DEFAULT_LABELS), interactive=siglip is not None)
            go = gr.Button("Classify", variant="primary", interactive=siglip is not None)
        with gr.Column():
            preview = gr.Image(label="Image", type="numpy", interactive=False, height=240,
                               format="png")
            chart = gr.BarPlot(x="label", y="probability", y_lim=[0, 1], label="Probability",
                               sort="-y", height=280)

    def run(file: str | None, label_text: str):
        if siglip is None:
            raise gr.Error(no_checkpoint(command), print_exception=False)
        try:
            names = parse_labels(label_text)
        except ValueError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        image = _first_image(service, file)
        try:
            table = classify(siglip, image, names)
        except Exception as exc:
            raise gr.Error(f"MedSigLIP failed: {one_line(exc)}", print_exception=False) from None
        return image, table

    go.click(run, [image_file, labels], [preview, chart], api_name="zero_shot",
             concurrency_id="medsiglip", concurrency_limit=1)


def _api(service: ChatService, config: DemoConfig) -> None:
    """The named ``/chat`` endpoint: hidden components, one event. Only ``message`` is
    required (the file and the settings have defaults, also for gradio_client)."""
    with gr.Column(visible=False):
        message = gr.Textbox(label="message")
        file = gr.File(label="file", file_count="single")
        system = gr.Textbox(label="system_prompt", value="")
        max_new = gr.Number(label="max_new_tokens", value=config.max_new_tokens, precision=0)
        temperature = gr.Number(label="temperature", value=0.0)
        modality = gr.Textbox(label="modality", value=AUTO)
        options = gr.Textbox(label="options", value="")
        penalty = gr.Number(label="repetition_penalty", value=None)
        ngram = gr.Number(label="no_repeat_ngram_size", value=None, precision=0)
        answer = gr.Textbox(label="answer")
        button = gr.Button("chat")
    button.click(service.api_chat,
                 [message, file, system, max_new, temperature, modality, options, penalty, ngram],
                 answer, api_name="chat", concurrency_id="model",
                 concurrency_limit=2 * config.max_batch,
                 api_description="A message (and optionally one file, read by the data plugins; "
                                 "modality 'auto' detects it; options: reading options as "
                                 "key=value lines) -> the whole answer. Every argument but the "
                                 "message is optional; repetition_penalty / "
                                 "no_repeat_ngram_size default to the prompt mode's.")


def build_app(config: DemoConfig = DemoConfig(), *, loader: Loader[ChatModel] | None = None,
              siglip: Loader[ZeroShotModel] | None = None) -> gr.Blocks:
    """The Blocks app. ``loader``/``siglip`` replace the loaders built from ``config`` (tests)."""
    loader = (loader or default_loader(config)).start()
    if siglip is None and config.medsiglip:
        from .zeroshot import load_medsiglip

        path = config.medsiglip
        siglip = Loader(lambda: load_medsiglip(path), what="MedSigLIP")
    if siglip is not None:
        siglip.start()
    command = config.command or launch_command()
    service = ChatService(loader, max_upload_mb=config.max_upload_mb,
                          checkpoint=config.checkpoint, prompt_mode=config.prompt_mode,
                          max_batch=config.max_batch, window_s=config.batch_window_ms / 1000,
                          command=command, queue_size=config.queue_size)

    runs = Runs(config.runs_dir, config.checkpoint)
    # Uploaded files (and gallery images) older than an hour leave Gradio's cache, hourly.
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"# {TITLE}")
        gr.Markdown(NOTICE, elem_id="notice")
        if config.checkpoint is None and loader is not None:
            gr.Markdown(default_model_note(command), elem_id="default-model-note")
        status = gr.Markdown(service.status(), elem_id="model-status")
        timer = gr.Timer(2.0)

        def tick():
            return service.status(), gr.Timer(active=True)

        timer.tick(tick, None, [status, timer], queue=False, api_visibility="private")
        app.load(tick, None, [status, timer], queue=False, api_visibility="private")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                _chat_tab(service, config)
            with gr.Tab("Train", id="train"):
                train_tab(service, config, runs)
            with gr.Tab("Evaluate", id="evaluate"):
                evaluate_tab(service, config, runs)
            with gr.Tab("MedSigLIP zero-shot", id="medsiglip"):
                _zero_shot_tab(service, siglip, command)
            with gr.Tab("Plugins", id="plugins"):
                gr.Markdown("Modality plugins installed (entry-point group "
                            "`medgemma.modalities`); `medgemma-data plugins` lists the same.")
                gr.Dataframe(plugin_table(), interactive=False, wrap=True, elem_id="plugins",
                             column_widths=["10%", "7%", "15%", "38%", "30%"])
                gr.Markdown(problems_markdown())
        _api(service, config)
    app.queue(max_size=config.queue_size, default_concurrency_limit=1)
    app.config_demo = config  # type: ignore[attr-defined]
    return app


def launch_kwargs(config: DemoConfig, **overrides: Any) -> dict[str, Any]:
    """Arguments for ``app.launch``: limits, error display, offline-friendly theme."""
    kwargs: dict[str, Any] = dict(
        max_file_size=f"{config.max_upload_mb}mb", show_error=True, footer_links=["api"],
        theme=gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                font_mono=["ui-monospace", "monospace"]),
        css=CSS, allowed_paths=[], ssr_mode=False)
    kwargs.update(overrides)
    return kwargs


