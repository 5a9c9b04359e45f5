"""One metrics writer, several sinks: ``metrics.jsonl`` (always), TensorBoard event files
(tensorboardX) and a tqdm bar with the loss and tokens/s. Stages report dicts; only this
module prints. Only process 0 writes.

Model FLOPs utilisation: ``6 * N`` FLOPs per trained token (forward and backward through the
``N`` parameters used per token, embedding lookups excluded, the tied output projection
included) plus causal attention at half its square, against the device's peak where known.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["MetricsWriter", "PEAK_FLOPS", "flops_per_token", "peak_flops"]

#: dense bf16 peak FLOP/s per device by ``device_kind`` prefix (vendor figures).
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12, "NVIDIA B200": 2250e12,
}


def peak_flops(device: Any) -> float | None:
    kind = str(getattr(device, "device_kind", ""))
    for prefix, value in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(prefix):
            return value
    return None


def flops_per_token(params_used: int, layers: int, seq_len: int, width: int) -> float:
    """Training FLOPs per token: ``6 N`` + causal attention ``6 * L * T * D`` (QK^T and AV,
    forward + backward, half the square)."""
    return 6.0 * params_used + 6.0 * layers * seq_len * width


class MetricsWriter:
    def __init__(self, folder: str | Path, *, total_steps: int, tensorboard: bool = True,
                 progress: bool = True, primary: bool = True, start_step: int = 0):
        self.primary = primary
        self.folder = Path(folder)
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not primary:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.folder / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.folder / "tensorboard"))
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step",
                             file=sys.stderr, dynamic_ncols=True, leave=False,
                             disable=None)
        self._t0 = time.time()

    def write(self, step: int, values: dict[str, Any], *, split: str = "train") -> None:
        if not self.primary:
            return
        clean = {}
        for k, v in values.items():
            try:
                f = float(v)
            except (TypeError, ValueError):
                clean[k] = v
                continue
            clean[k] = f if math.isfinite(f) else None
            if self._tb is not None and math.isfinite(f):
                self._tb.add_scalar(f"{split}/{k}", f, step)
        line = {"step": int(step), "split": split, "time": round(time.time() - self._t0, 3),
                **clean}
        self._jsonl.write(json.dumps(line) + "\n")
        self._jsonl.flush()
        if self._bar is not None and split == "train":
            post = {"loss": f"{clean.get('loss', float('nan')):.4f}"}
            if clean.get("tokens_per_s"):
                post["tok/s"] = f"{clean['tokens_per_s']:.0f}"
            self._bar.set_postfix(post, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
