"""The page: Chat, MedSigLIP zero-shot and Plugins tabs, and the named ``/chat`` endpoint.

    from medgemma_demo import DemoConfig, build_app
    app = build_app(DemoConfig(checkpoint=None))      # the embedded Gemma 3 270M
    app.launch(**launch_kwargs(config))

``build_app`` starts loading the model in a background thread and returns at once; the page
shows the loading state and queues questions until the model is ready.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np

from .chat import AUTO, MAX_NEW_TOKENS, ChatService
from .host import ChatModel, Loader, one_line
from .plugins import plugin_table, problems_markdown
from .presets import PRESETS, preset
from .zeroshot import DEFAULT_LABELS, NO_CHECKPOINT, ZeroShotModel, classify, parse_labels

log = logging.getLogger("medgemma_demo")

TITLE = "MedGemma demo (JAX / Flax)"

NOTICE = (
    "⚠ **Research use only. Not for clinical decisions.** Answers can be wrong or invented. "
    "Do not upload identifiable patient data to a shared server. MedGemma and Gemma weights "
    "are subject to their own terms of use.")

DEFAULT_MODEL_NOTE = (
    "You are running the **embedded default model: Gemma 3 270M**, a small *text-only base* "
    "model. It is **not** a medical model and it cannot see images: it is here so the app "
    "works out of the box. For MedGemma, download `google/medgemma-4b-it` (or -27b) from "
    "Hugging Face and start `medgemma-demo --checkpoint path/to/medgemma-4b-it`.")

CSS = """
#notice {border: 2px solid #d97706; border-radius: 8px; padding: 4px 12px; background: #fffbeb;}
#notice p {color: #78350f;}
"""


@dataclass(frozen=True)
class DemoConfig:
    """What the command line sets. ``checkpoint``: None for the embedded default model;
    ``medsiglip``: a MedSigLIP folder or None; ``max_upload_mb``: per-file upload limit;
    ``max_new_tokens``: the slider's start value; ``warmup``: compile the first generation
    while loading; ``queue_size``: waiting requests beyond which new ones are refused."""

    checkpoint: str | None = None
    medsiglip: str | None = None
    max_upload_mb: int = 1024
    max_new_tokens: int = 128
    warmup: bool = True
    queue_size: int = 64


def default_loader(config: DemoConfig) -> Loader[ChatModel]:
    """Load ``config.checkpoint`` (None: the embedded default) with medgemma-core."""

    def load() -> ChatModel:
        from medgemma_core import load as core_load

        return core_load(config.checkpoint)

    def warmup(model: ChatModel) -> None:
        # One short answer, the shape of a first question: the first user waits less.
        prompt = [{"role": "user", "content": "What is a pneumothorax?"}]
        for _ in model.chat_stream(prompt, max_new_tokens=config.max_new_tokens):
            pass

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
                                    label="Max new tokens")
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05,
                                        label="Temperature (0 = greedy)")
        with gr.Column(scale=2):
            task = gr.Dropdown([p.name for p in PRESETS], value=None, label="Task preset",
                               info="Fills the system prompt and the question")
            expects = gr.Markdown()
            files = gr.File(label="Upload: PNG/JPEG, DICOM, zipped CT/MRI series, slide, "
                                  "FHIR JSON", file_count="multiple", elem_id="upload")
            read_as = gr.Dropdown([AUTO, *plugin_table()["modality"]], value=AUTO,
                                  label="Read as", elem_id="read-as",
                                  info="auto: the data plugins detect the modality")
            upload_status = gr.Markdown(elem_id="upload-status")
            gallery = gr.Gallery(label="What the model sees", columns=3, height=360,
                                 elem_id="gallery", format="png", interactive=False)

    def on_preset(name: str | None):
        if not name:
            return gr.update(), gr.update(), ""
        p = preset(name)
        return p.system, p.prompt, f"Attach: {p.expects}."

    task.change(on_preset, task, [system, text, expects], queue=False, api_visibility="private")
    files.upload(service.upload, [files, read_as], [gallery, upload_status, pending],
                 concurrency_id="uploads", concurrency_limit=2, api_visibility="private")
    read_as.change(service.upload, [files, read_as], [gallery, upload_status, pending],
                   concurrency_id="uploads", concurrency_limit=2, api_visibility="private")
    files.clear(lambda: ([], "", []), None, [gallery, upload_status, pending], queue=False,
                api_visibility="private")

    submit_args = dict(fn=service.submit, inputs=[text, display, pending],
                       outputs=[text, chatbot, display, question], queue=False,
                       api_visibility="private")
    respond_args = dict(fn=service.respond,
                        inputs=[question, display, history, pending, system, max_new, temperature],
                        outputs=[chatbot, display, history, pending, files], concurrency_id="model",
                        concurrency_limit=1, api_visibility="undocumented")
    for trigger in (send.click, text.submit):
        trigger(**submit_args).success(**respond_args)
    stop.click(service.request_stop, None, None, queue=False, api_visibility="private")

    def reset():
        return [], [], [], [], "", None, "", []

    cleared = [chatbot, display, history, pending, upload_status, files, text, gallery]
    clear.click(reset, None, cleared, queue=False, api_visibility="private")
    chatbot.clear(reset, None, cleared, queue=False, api_visibility="private")


def _zero_shot_tab(service: ChatService, siglip: Loader[ZeroShotModel] | None) -> None:
    if siglip is None:
        gr.Markdown(NO_CHECKPOINT, elem_id="medsiglip-missing")
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
            raise gr.Error(NO_CHECKPOINT, print_exception=False)
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
    """The named ``/chat`` endpoint: hidden components, one event."""
    with gr.Column(visible=False):
        message = gr.Textbox(label="message")
        file = gr.File(label="file", file_count="single")
        system = gr.Textbox(label="system_prompt", value="")
        max_new = gr.Number(label="max_new_tokens", value=config.max_new_tokens, precision=0)
        temperature = gr.Number(label="temperature", value=0.0)
        modality = gr.Textbox(label="modality", value=AUTO)
        answer = gr.Textbox(label="answer")
        button = gr.Button("chat")
    button.click(service.api_chat, [message, file, system, max_new, temperature, modality], answer,
                 api_name="chat", concurrency_id="model", concurrency_limit=1,
                 api_description="A message (and optionally one file, read by the data "
                                 "plugins; modality 'auto' detects it) -> the whole answer.")


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
    service = ChatService(loader, max_upload_mb=config.max_upload_mb)

    # Uploaded files (and gallery images) older than an hour leave Gradio's cache, hourly.
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"# {TITLE}")
        gr.Markdown(NOTICE, elem_id="notice")
        if config.checkpoint is None and loader is not None:
            gr.Markdown(DEFAULT_MODEL_NOTE, elem_id="default-model-note")
        status = gr.Markdown(service.status(), elem_id="model-status")
        timer = gr.Timer(1.0)

        def tick():
            return service.status(), gr.Timer(active=not loader.done)

        timer.tick(tick, None, [status, timer], queue=False, api_visibility="private")
        app.load(tick, None, [status, timer], queue=False, api_visibility="private")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                _chat_tab(service, config)
            with gr.Tab("MedSigLIP zero-shot", id="medsiglip"):
                _zero_shot_tab(service, siglip)
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


