"""The ``medsiglip`` command against transformers (processor + SiglipModel) on the same files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from medsiglip.cli import main


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    arr = np.random.default_rng(0).integers(0, 256, (50, 40, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "scan.png"
    Image.fromarray(arr).save(path)
    jpg = path.with_suffix(".jpg")
    Image.fromarray(arr).save(jpg, quality=95)
    return path


def _hf_inputs(folder, image_path, labels):
    proc = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    tok = transformers.SiglipTokenizer(str(folder / "spiece.model"))
    pix = proc(Image.open(image_path), return_tensors="pt")["pixel_values"]
    ids = tok(labels, padding="max_length", truncation=True, max_length=16,
              return_tensors="pt")["input_ids"]
    return pix, ids


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_zero_shot_matches_transformers(hf_siglip_dir, hf_siglip, image_file, capsys):
    labels = ["normal chest radiograph", "pneumothorax", "Pleural effusion!"]
    code = main(["zero-shot", "--checkpoint", str(hf_siglip_dir), "--image", str(image_file),
                 "--labels", *labels])
    out = capsys.readouterr().out
    assert code == 0
    result = _last_json(out)
    assert result["labels"] == labels
    pix, ids = _hf_inputs(hf_siglip_dir, image_file, labels)
    with torch.no_grad():
        ref = torch.sigmoid(hf_siglip(input_ids=ids, pixel_values=pix).logits_per_image)[0]
    np.testing.assert_allclose(result["probs"], ref.numpy(), atol=1e-4)
    assert len(out.strip().splitlines()) == 4  # one line per label, then the JSON


def test_embed_image_and_text_json(hf_siglip_dir, hf_siglip, image_file, capsys):
    assert main(["embed", "--checkpoint", str(hf_siglip_dir), "--image",
                 str(image_file.with_suffix(".jpg")), "--json"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    emb = np.asarray(_last_json(out)["embedding"])
    pix, ids = _hf_inputs(hf_siglip_dir, image_file.with_suffix(".jpg"), ["lung nodule"])
    with torch.no_grad():
        ref = hf_siglip(input_ids=ids, pixel_values=pix)
    np.testing.assert_allclose(emb, ref.image_embeds[0].numpy(), atol=1e-4)
    assert main(["embed", "--checkpoint", str(hf_siglip_dir), "--text", "lung nodule"]) == 0
    text = np.asarray(_last_json(capsys.readouterr().out)["embedding"])
    np.testing.assert_allclose(text, ref.text_embeds[0].numpy(), atol=1e-4)


def test_probe_on_image_folder(hf_siglip_dir, tmp_path, capsys):
    rng = np.random.default_rng(1)
    for cls, level in (("dark", 20), ("bright", 235)):
        (tmp_path / cls).mkdir()
        for i in range(8):
            arr = np.clip(level + rng.normal(0, 8, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
    assert main(["probe", "--checkpoint", str(hf_siglip_dir), "--data", str(tmp_path),
                 "--test-fraction", "0.25", "--json"]) == 0
    result = _last_json(capsys.readouterr().out)
    assert result["classes"] == ["bright", "dark"]
    assert (result["n_train"], result["n_test"]) == (12, 4)
    assert result["accuracy"] == 1.0 and result["auc"] == 1.0


def test_user_errors_are_one_line(hf_siglip_dir, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    assert main(["zero-shot", "--checkpoint", str(hf_siglip_dir), "--image", str(bad),
                 "--labels", "a"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable image" in err[0]
    assert main(["embed", "--checkpoint", str(tmp_path), "--text", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0]


def test_console_script_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "medsiglip.cli", "zero-shot", "--checkpoint",
         str(tmp_path / "absent"), "--image", "x.png", "--labels", "a"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("medsiglip: error:")
    help_text = subprocess.run([sys.executable, "-m", "medsiglip.cli", "--help"],
                               capture_output=True, text=True, timeout=300).stdout
    assert "zero-shot" in help_text and "probe" in help_text


def test_resample_follows_preprocessor_config(hf_siglip_dir, hf_siglip, image_file, tmp_path,
                                              capsys):
    import shutil

    folder = tmp_path / "ck"
    shutil.copytree(hf_siglip_dir, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "SiglipImageProcessor", "resample": 2,
         "size": {"height": 32, "width": 32}}))
    assert main(["embed", "--checkpoint", str(folder), "--image", str(image_file),
                 "--json"]) == 0
    emb = np.asarray(_last_json(capsys.readouterr().out)["embedding"])
    proc = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32}, resample=2)
    pix = proc(Image.open(image_file), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = hf_siglip.get_image_features(pixel_values=pix).pooler_output[0]
    np.testing.assert_allclose(emb, (ref / ref.norm()).numpy(), atol=1e-4)


def test_help_is_plain_text(capsys):
    """``medsiglip --help`` and each subcommand's help read as plain text: no reStructuredText
    or Markdown markup (double or single backticks, :func: roles) from docstrings."""
    import argparse
    import re

    import pytest

    from medsiglip.cli import _parser, main

    markup = re.compile(r"`|:(func|class|meth|mod|attr|obj|exc|ref|doc):")
    subparsers = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    commands = [[]] + [[name] for a in subparsers for name in a.choices]
    assert len(commands) == 5  # medsiglip, embed, zero-shot, probe, convert
    for command in commands:
        with pytest.raises(SystemExit) as done:
            main([*command, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: medsiglip"), command
        assert not markup.search(out), (command, markup.search(out))
