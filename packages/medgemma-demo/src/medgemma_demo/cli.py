"""The ``medgemma-demo`` command: start the Gradio app and print its local URL."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

EPILOG = """\
examples:
  medgemma-demo                                   (embedded Gemma 3 270M, text-only)
  medgemma-demo --checkpoint medgemma-4b-it/      (MedGemma, image-text)
  medgemma-demo --checkpoint medgemma-4b-it/ --medsiglip medsiglip-448/ --port 7861
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medgemma-demo", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A Gradio app for MedGemma: chat with uploads (DICOM, CT/MRI series, "
                    "slides, photos, FHIR), MedSigLIP zero-shot, the installed data plugins. "
                    "Research use only; not for clinical decisions.")
    p.add_argument("--checkpoint", metavar="DIR_OR_GGUF",
                   help="a MedGemma / Gemma 3 Hugging Face folder, .gguf file or Orbax folder "
                        "(default: the embedded Gemma 3 270M, a small text-only base model)")
    p.add_argument("--medsiglip", metavar="DIR",
                   help="a MedSigLIP folder (google/medsiglip-448 or medsiglip Orbax) for the "
                        "zero-shot tab")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0 for every interface; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true",
                   help="also open a temporary public gradio.live link (needs internet)")
    p.add_argument("--max-upload-mb", type=int, default=1024,
                   help="largest upload per file in MB (default 1024)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="start value of the max-new-tokens slider (default 128)")
    p.add_argument("--no-warmup", action="store_true",
                   help="do not compile the first generation while loading")
    p.add_argument("--quantize", choices=("int8", "int8-g32"), default=None,
                   help="int8 decoder weights (half the memory, faster batch-1 decoding; "
                        "medgemma_core.load's quantize, through MEDGEMMA_QUANTIZE)")
    p.add_argument("--prompt-mode", choices=("auto", "chat", "base"), default="auto",
                   help="chat: the checkpoint's chat template; base: a completion prompt "
                        "('Question: ... Answer:') for base models; auto (default): base for "
                        "the embedded default and checkpoints without a chat template")
    p.add_argument("--max-batch", type=int, default=8,
                   help="questions decoded together in one batch (default 8)")
    p.add_argument("--batch-window-ms", type=int, default=250,
                   help="how long a question waits at most for others to join its batch; the "
                        "batch starts sooner once 50 ms pass without a new one (default 250)")
    p.add_argument("--queue-size", type=int, default=64,
                   help="waiting requests beyond which new ones are refused (default 64)")
    p.add_argument("--runs-dir", metavar="DIR",
                   help="folder for the Train and Evaluate tabs' runs (default: a temporary "
                        "folder)")
    return p


def _fail(message: str) -> int:
    print(f"medgemma-demo: error: {message}", file=sys.stderr)
    return 2


def _port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now (checked before any model loading starts)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            s.bind(address)
        except OSError:
            return False
    return True


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.checkpoint and not Path(args.checkpoint).exists():
        return _fail(f"--checkpoint {args.checkpoint}: no such file or folder; pass a MedGemma "
                     "folder or a .gguf file, or leave it out for the embedded default model")
    if args.medsiglip and not Path(args.medsiglip).is_dir():
        return _fail(f"--medsiglip {args.medsiglip}: no such folder; pass a MedSigLIP "
                     "checkpoint folder or leave it out")
    if not 1 <= args.port <= 65535:
        return _fail(f"--port {args.port} must be in 1..65535")
    if not _port_free(args.host, args.port):
        return _fail(f"cannot listen on {args.host}:{args.port} (in use, or not an address of "
                     "this machine); pass another --port or --host")
    if args.max_upload_mb < 1:
        return _fail("--max-upload-mb must be at least 1")
    if not 1 <= args.max_new_tokens <= 2048:
        return _fail("--max-new-tokens must be in 1..2048")
    if not 1 <= args.max_batch <= 256:
        return _fail("--max-batch must be in 1..256")
    if not 0 <= args.batch_window_ms <= 10000:
        return _fail("--batch-window-ms must be in 0..10000")
    if args.queue_size < 1:
        return _fail("--queue-size must be at least 1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # Third-party loggers stay at WARNING: request logs can carry upload file names.
    for noisy in ("httpx", "uvicorn.access", "jax", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    # Ctrl+C and `kill` stop the server cleanly, even when started in the background (where
    # the shell may have set SIGINT to be ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)

    if args.quantize:
        os.environ["MEDGEMMA_QUANTIZE"] = args.quantize  # medgemma_core.load's default
    from medgemma_core import enable_compilation_cache

    from .app import DemoConfig, build_app, launch_kwargs

    enable_compilation_cache()  # compiled programs kept for the next start (MEDGEMMA_JAX_CACHE)

    config = DemoConfig(checkpoint=args.checkpoint, medsiglip=args.medsiglip,
                        max_upload_mb=args.max_upload_mb, max_new_tokens=args.max_new_tokens,
                        warmup=not args.no_warmup, prompt_mode=args.prompt_mode,
                        max_batch=args.max_batch, batch_window_ms=args.batch_window_ms,
                        queue_size=args.queue_size, runs_dir=args.runs_dir)
    app = build_app(config)
    try:
        app.launch(**launch_kwargs(config, server_name=args.host, server_port=args.port,
                                   share=args.share, quiet=True, prevent_thread_lock=True))
    except OSError as exc:
        _fail(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); "
              "pass another --port")
        sys.stderr.flush()
        os._exit(2)  # the model is loading in a thread; do not wait for it
    print(f"MedGemma demo running on {app.local_url}  (Ctrl+C to stop)", flush=True)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
