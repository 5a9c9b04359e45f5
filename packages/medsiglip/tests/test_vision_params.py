"""The vision tower's parameter tree is medsiglip's public interface (README.md, "The vision
tower's parameters"): medgemma-core's checkpoints embed these paths. They are compared with
the committed list in ``vision_param_paths.txt``; changing it bumps the minor version."""

from __future__ import annotations

import json
from pathlib import Path

from flax import nnx

from medsiglip import SiglipVisionConfig, VisionTower

FROZEN = Path(__file__).with_name("vision_param_paths.txt")


def _frozen() -> dict[str, list[int]]:
    rows = [line.split(" ", 1) for line in FROZEN.read_text().splitlines()
            if line and not line.startswith("#")]
    return {path: json.loads(shape) for path, shape in rows}


def _tree(config: SiglipVisionConfig) -> dict[str, list[int]]:
    tower = VisionTower(config, rngs=nnx.Rngs(0))
    flat = nnx.to_flat_state(nnx.state(tower))  # every variable, not only nnx.Param
    return {"/".join(map(str, path)): list(var.shape) for path, var in flat}


def _diff(got: dict[str, list[int]], want: dict[str, list[int]]) -> str:
    added = sorted(set(got) - set(want))
    removed = sorted(set(want) - set(got))
    reshaped = sorted(p for p in set(got) & set(want) if got[p] != want[p])
    return f"added {added[:5]}, removed {removed[:5]}, reshaped {reshaped[:5]}"


def test_vision_parameter_tree_is_the_committed_list():
    got, want = _tree(SiglipVisionConfig.tiny()), _frozen()
    assert got == want, _diff(got, want)
    assert all(isinstance(v, nnx.Param) for _, v in nnx.to_flat_state(
        nnx.state(VisionTower(SiglipVisionConfig.tiny(), rngs=nnx.Rngs(0)))))


def test_without_the_head_only_head_paths_go():
    got = _tree(SiglipVisionConfig.tiny(use_head=False))
    want = {p: s for p, s in _frozen().items() if not p.startswith("head/")}
    assert got == want, _diff(got, want)
