"""Inputs the fuzzer (fuzz/ at the repository root) found escaping medsiglip's readers,
minimised: a config.json of a checkpoint folder must give ``CheckpointError`` naming it (the
config mappings ``ValueError``), an image file ``ValueError``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import medsiglip
from medsiglip import CheckpointError, SiglipConfig

HERE = Path(__file__).resolve().parent / "fuzz_regressions"

#: file -> what escaped before
CASES = {
    "vision_config_intermediate_size_object.json": "TypeError: int({})",
    "vision_config_num_layers_null.json": "TypeError: int(None)",
    "vision_config_intermediate_size_1e308.json": "OverflowError: int(inf)",
    "vision_config_negative_intermediate_size.json": "TypeError from JAX: a negative shape",
    "siglip_config_patch_size_object.json": "TypeError: int({}) in _square",
    "bmp_claiming_64g_pixels.bmp": "PIL.Image.DecompressionBombError (not a ValueError)",
}
VISION = [n for n in CASES if n.startswith("vision_config")]


def test_every_committed_input_has_a_case():
    assert sorted(p.name for p in HERE.iterdir() if p.is_file()) == sorted(CASES)


@pytest.mark.parametrize("name", VISION)
def test_vision_config_finding_is_a_checkpoint_error(name, tmp_path):
    (tmp_path / "config.json").write_bytes((HERE / name).read_bytes())
    with pytest.raises(CheckpointError, match="config.json"):
        medsiglip.load_vision_tower(tmp_path)


def test_siglip_config_finding_is_a_value_error():
    raw = json.loads((HERE / "siglip_config_patch_size_object.json").read_text())
    with pytest.raises(ValueError, match="wrong type"):
        SiglipConfig.from_hf_dict(raw)


def test_image_claiming_64g_pixels_is_a_value_error():
    with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
        medsiglip.load_image(HERE / "bmp_claiming_64g_pixels.bmp")
