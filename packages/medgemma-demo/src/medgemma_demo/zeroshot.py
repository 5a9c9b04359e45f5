"""The MedSigLIP tab: zero-shot classification of an uploaded image against editable labels.

Probabilities are SigLIP's per-label sigmoids (labels are scored independently, they need not
sum to one). The image goes through the data plugins first, so a DICOM works like a PNG.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from .host import Loader

log = logging.getLogger("medgemma_demo")

DEFAULT_LABELS = ("a chest X-ray with a pneumothorax", "a chest X-ray with pleural effusion",
                  "a chest X-ray with cardiomegaly", "a normal chest X-ray")

def no_checkpoint(command: str = "medgemma-demo") -> str:
    """What the tab says without a checkpoint: how to start the demo with one."""
    return (
        "**This tab is off: no MedSigLIP checkpoint loaded.** To turn it on, download "
        "`google/medsiglip-448` from Hugging Face (a folder with config.json, model.safetensors "
        "and spiece.model; or a folder written by `medsiglip.save_checkpoint`) and restart "
        f"with `{command} --medsiglip path/to/medsiglip-448`; then classify images against "
        "your own labels here.")


NO_CHECKPOINT = no_checkpoint()


class ZeroShotModel(Protocol):
    """What the tab needs (``medsiglip.MedSigLIP`` has it): images ``uint8 [B, H, W, 3]`` and
    labels -> sigmoid probabilities ``[B, len(labels)]``."""

    def zero_shot(self, images: Any, labels: list[str]) -> np.ndarray: ...


def load_medsiglip(path: str | Path) -> ZeroShotModel:
    from medsiglip import MedSigLIP

    return MedSigLIP.from_pretrained(path)


def parse_labels(text: str) -> list[str]:
    """One label per line (commas also split); blanks and duplicates dropped, order kept."""
    raw = [part.strip() for line in (text or "").splitlines() for part in line.split(",")]
    labels = list(dict.fromkeys(label for label in raw if label))
    if not labels:
        raise ValueError("enter at least one label, one per line")
    if len(labels) > 64:
        raise ValueError(f"{len(labels)} labels; at most 64")
    return labels


def classify(loader: Loader[ZeroShotModel], image: np.ndarray, labels: list[str]) -> pd.DataFrame:
    """``uint8 [H, W, 3]`` image + labels -> a table (label, probability), most likely first."""
    model = loader.wait(600)
    if model is None:
        raise RuntimeError(f"MedSigLIP is not available: {loader.error or 'still loading'}")
    start = time.perf_counter()
    probs = np.asarray(model.zero_shot([image], labels))[0]
    log.info("zero-shot: %d labels in %.2f s", len(labels), time.perf_counter() - start)
    table = pd.DataFrame({"label": labels, "probability": probs.astype(float)})
    return table.sort_values("probability", ascending=False, kind="stable").reset_index(drop=True)
