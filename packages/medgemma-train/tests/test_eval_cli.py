"""The command: the JSON contract, one-line errors with exit status 2, the MedSigLIP zero-shot
AUC mode against transformers + scikit-learn, and the comparison report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medgemma_train.cli import main

SIGLIP_CORPUS = ["a chest x-ray showing pneumonia", "normal chest radiograph",
                 "chest x-ray showing cardiomegaly", "pleural effusion", "edema",
                 "atelectasis at the base", "consolidation in the lobe"]


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    return err


def test_eval_json_and_items(tiny_text, capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["eval", "pubmedqa", "--checkpoint", str(tiny_text[0]), "--limit", "3",
                 "--out", str(out), "--json", "--no-progress", "--n-boot", "200"]) == 0
    summary = _last_json(capsys.readouterr().out)
    assert (summary["task"], summary["mode"], summary["n"]) == ("pubmedqa", "loglik", 3)
    assert summary["metrics"]["accuracy"]["ci95"][0] <= summary["metrics"]["accuracy"]["value"]
    assert json.loads((out / "summary.json").read_text())["n"] == 3
    rec = json.loads((out / "items.jsonl").read_text().splitlines()[0])
    assert {"id", "prompt", "options", "parsed", "gold", "correct"} <= set(rec)
    assert rec["prompt"].endswith("C. maybe\nAnswer:")
    assert [o["continuation"] for o in rec["options"]] == [" A", " B", " C"]
    assert rec["correct"] == (rec["parsed"] == rec["gold"])


def test_user_errors_are_one_line(tiny_text, capsys, tmp_path):
    out = str(tmp_path / "o")
    ck = str(tiny_text[0])
    _one_line_error(capsys, ["eval", "nosuch", "--checkpoint", ck, "--out", out],
                    "unknown task 'nosuch'")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "not a question"}\n')
    _one_line_error(capsys, ["eval", "medqa", "--checkpoint", ck, "--data", str(bad), "--out",
                             out], "not a multiple-choice JSONL")
    _one_line_error(capsys, ["eval", "medqa", "--checkpoint", ck, "--data", "nope.jsonl",
                             "--out", out], "no such file")
    broken = tmp_path / "ck"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    _one_line_error(capsys, ["eval", "medqa", "--checkpoint", str(broken), "--out", out],
                    "cannot load it")
    _one_line_error(capsys, ["eval", "medqa", "--checkpoint", ck, "--mode", "zeroshot",
                             "--out", out], "scored by loglik or generate")
    _one_line_error(capsys, ["eval", "slake", "--checkpoint", ck, "--out", out],
                    "has no bundled data; pass --data")
    _one_line_error(capsys, ["eval", "medqa", "--checkpoint", ck, "--limit", "0", "--out", out],
                    "--limit 0")
    _one_line_error(capsys, ["eval", "medqa", "--out", out], "--checkpoint")  # argparse
    _one_line_error(capsys, ["compare", str(tmp_path), "--out", out], "not an eval run folder")


def test_text_only_checkpoint_on_an_image_task(tiny_text, capsys, tmp_path):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    data = tmp_path / "vqa.json"
    data.write_text(json.dumps([{"question": "q", "answer": "yes", "image_name": "a.png"}]))
    _one_line_error(capsys, ["eval", "vqa_rad", "--checkpoint", str(tiny_text[0]), "--data",
                             str(data), "--out", str(tmp_path / "o")], "text-only checkpoint")


def test_help_of_the_eval_subcommands(capsys):
    for name in ("eval", "compare", "tasks"):
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert name in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "eval" in capsys.readouterr().out


def test_tasks_command(capsys):
    assert main(["tasks", "--json"]) == 0
    listed = _last_json(capsys.readouterr().out)
    medqa = next(t for t in listed["tasks"] if t["name"] == "medqa")
    assert medqa["distribution"] == "medgemma-train" and medqa["bundled_data"]
    assert medqa["modes"] == ["loglik", "generate"]


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    """A tiny random transformers SiglipModel folder with a SentencePiece model."""
    import shutil

    import torch
    import transformers

    from medsiglip import SiglipConfig
    from medsiglip.testing import train_sentencepiece

    folder = tmp_path_factory.mktemp("siglip")
    spm = train_sentencepiece(tmp_path_factory.mktemp("spm"), SIGLIP_CORPUS, vocab_size=60)
    torch.manual_seed(0)
    cfg = SiglipConfig.tiny(vocab_size=64, image_size=32)
    model = transformers.SiglipModel(transformers.SiglipConfig(**cfg.to_hf_dict())).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + offset)
    model.save_pretrained(folder)
    shutil.copyfile(spm, folder / "spiece.model")
    return folder, model


def _cxr_manifest(folder, n=12):
    (folder / "img").mkdir()
    rng = np.random.default_rng(4)
    labels = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
    rows = []
    for i in range(n):
        gray = rng.integers(0, 256, (40, 36), dtype=np.uint8)
        Image.fromarray(gray, mode="L").save(folder / "img" / f"{i}.png")
        present = [lab for j, lab in enumerate(labels) if (i >> (j % 4)) & 1 or (i + j) % 5 == 0]
        rows.append({"image": f"img/{i}.png", "labels": present})
    path = folder / "cxr.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows, labels


def test_zeroshot_auc_matches_transformers_and_sklearn(siglip, capsys, tmp_path):
    import torch
    import transformers
    from sklearn.metrics import roc_auc_score

    import medgemma_data

    folder, model = siglip
    data, rows, labels = _cxr_manifest(tmp_path)
    out = tmp_path / "zs"
    assert main(["eval", "cxr_labels", "--mode", "zeroshot", "--checkpoint", str(folder),
                 "--data", str(data), "--out", str(out), "--json", "--no-progress"]) == 0
    summary = _last_json(capsys.readouterr().out)
    # the reference: the radiograph plugin's pixels through transformers' SigLIP
    proc = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    tok = transformers.SiglipTokenizer(str(folder / "spiece.model"))
    texts = [f"chest x-ray showing {lab.lower()}" for lab in labels]
    ids = tok(texts, padding="max_length", truncation=True, max_length=16,
              return_tensors="pt")["input_ids"]
    images = [Image.fromarray(medgemma_data.load(data.parent / r["image"],
                                                 modality="radiograph")[0].images[0])
              for r in rows]
    with torch.no_grad():
        probs = torch.sigmoid(model(input_ids=ids, pixel_values=proc(
            images, return_tensors="pt")["pixel_values"]).logits_per_image).numpy()
    records = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    got = np.array([[r["scores"][lab] for lab in labels] for r in records])
    np.testing.assert_allclose(got, probs, atol=1e-4)
    aucs = {lab: roc_auc_score([lab in r["labels"] for r in rows], probs[:, j])
            for j, lab in enumerate(labels)}
    assert summary["metrics"]["auc"]["value"] == pytest.approx(np.mean(list(aucs.values())),
                                                               abs=1e-6)
    assert summary["auc_per_label"] == pytest.approx(aucs, abs=1e-6)


@pytest.mark.slow  # two eval runs then compare (CI time)
def test_compare_runs_table_and_chart(tiny_text, capsys, tmp_path):
    from medgemma_train.evals import compare

    ck = str(tiny_text[0])
    data = tmp_path / "medqa_short.jsonl"  # short questions: one compiled length
    data.write_text("".join(json.dumps({
        "question": f"What is {i} plus one?", "answer_idx": "ABCD"[i % 4],
        "options": {k: str(i + d) for k, d in zip("ABCD", (1, 2, 0, 3))}}) + "\n"
        for i in range(6)))
    for mode in ("loglik", "generate"):
        assert main(["eval", "medqa", "--checkpoint", ck, "--mode", mode, "--data", str(data),
                     "--max-new-tokens", "4", "--out", str(tmp_path / mode),
                     "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "loglik"), str(tmp_path / "generate"), "--out",
                 str(tmp_path / "report"), "--names", "base", "other", "--n-boot", "300"]) == 0
    table = (tmp_path / "report" / "comparison.md").read_text()
    assert "| base |" in table and "| other |" in table and "p (paired bootstrap)" in table
    result = compare([tmp_path / "loglik", tmp_path / "generate"], n_boot=300)
    acc = [r["metrics"]["accuracy"]["value"] for r in result["runs"]]
    records = [[json.loads(x) for x in (tmp_path / m / "items.jsonl").read_text().splitlines()]
               for m in ("loglik", "generate")]
    assert acc == [np.mean([r["correct"] for r in recs]) for recs in records]
    assert result["runs"][1]["metrics"]["accuracy"]["vs_base"]["delta"] == pytest.approx(
        acc[1] - acc[0])
    png = Image.open(tmp_path / "report" / "comparison.png")
    assert png.format == "PNG" and png.size[0] > 200
