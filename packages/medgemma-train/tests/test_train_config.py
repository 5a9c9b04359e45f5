"""Configs, data checks, stage registry and the command's one-line errors (no model needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medgemma_train.cli import main
from medgemma_train.engine import stages
from medgemma_train.engine.config import ConfigError, OptimizerConfig, SourceConfig, load_config
from medgemma_train.engine.data import DataError, check_bad_rows, read_source
from medgemma_train.engine.step import make_schedule


def test_defaults_follow_the_notebook_recipe():
    cfg = load_config()
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (16, 16.0, 0.05)
    assert cfg.optimizer.lr == 2e-4 and cfg.optimizer.max_grad_norm == 0.3
    assert cfg.optimizer.warmup_ratio == 0.03 and cfg.optimizer.decay == "linear"
    assert cfg.data.batch_size == 16 and cfg.run.epochs == 1.0


def test_yaml_flags_and_dotted_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("optimizer:\n  lr: 1.0e-3\n  name: adafactor\ndata:\n  train: a.jsonl\n"
                 "run:\n  export: [hf]\n")
    cfg = load_config(f, flags={"data": {"batch_size": 4}, "optimizer": {"lr": 5e-4}},
                      overrides=["optimizer.lr=1e-4", "data.train.0.weight=3",
                                 "run.export=[hf, peft]", "lora.rank=0"])
    assert cfg.optimizer.lr == 1e-4  # --set wins over flags, flags over the file
    assert cfg.optimizer.name == "adafactor" and cfg.data.batch_size == 4
    assert cfg.data.train[0].path == "a.jsonl" and cfg.data.train[0].weight == 3.0
    assert cfg.run.export == ("hf", "peft") and cfg.lora.rank == 0
    with pytest.raises(AttributeError):
        cfg.optimizer.lr = 1.0  # frozen


@pytest.mark.parametrize("override, words", [
    ("optimizer.lrr=1", ["optimizer.lrr", "did you mean optimizer.lr?"]),
    ("optimiser.lr=1", ["optimiser", "did you mean optimizer"]),
    ("run.max_step=3", ["did you mean run.max_steps?"]),
    ("data.batch_size=many", ["data.batch_size", "integer"]),
    ("optimizer.name=sgd", ["adamw", "adafactor"]),
])
def test_bad_keys_and_values_name_the_fix(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_schedule_by_hand():
    # 100 steps, warmup 3% = 3 steps from 0, then linear to 0 at step 100 (transformers').
    s = make_schedule(OptimizerConfig(lr=2e-4), 100)
    assert float(s(0)) == 0.0
    assert float(s(1)) == pytest.approx(2e-4 / 3, rel=1e-5)
    assert float(s(3)) == pytest.approx(2e-4, rel=1e-5)
    assert float(s(50)) == pytest.approx(2e-4 * 50 / 97, rel=1e-5)
    c = make_schedule(OptimizerConfig(lr=1.0, decay="cosine", warmup_ratio=0.0), 10)
    assert float(c(5)) == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.5)), abs=1e-6)


def _chat(rows):
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"


def test_bad_rows_are_reported_with_file_and_line(tmp_path):
    img = tmp_path / "ok.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    good = {"messages": [{"role": "user", "content": [{"type": "image", "image": "ok.png"},
                                                      {"type": "text", "text": "q"}]},
                         {"role": "assistant", "content": "a"}]}
    missing = {"messages": [{"role": "user", "content": [{"type": "image", "image": "no.png"}]},
                            {"role": "assistant", "content": "a"}]}
    empty = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}
    f = tmp_path / "train.jsonl"
    f.write_text(_chat([good, missing, "{not json", empty, good]))
    src = read_source(SourceConfig(path=str(f)))
    assert len(src.examples) == 2
    assert [(b.where.rsplit(":", 1)[1], b.reason.split(" ")[0]) for b in src.bad] == [
        ("2", "image"), ("3", "not"), ("4", "empty")]
    assert "no.png not found" in src.bad[0].reason
    with pytest.raises(DataError) as info:
        check_bad_rows([src], skip_bad=False)
    assert f"{f}:2" in str(info.value) and "--skip-bad" in str(info.value)
    assert len(check_bad_rows([src], skip_bad=True)) == 3


def test_manifest_csv_and_split(tmp_path):
    img = tmp_path / "a.png"
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(img)
    f = tmp_path / "labels.csv"
    f.write_text("path,question,answer,split\na.png,What?,yes,train\na.png,What?,no,val\n"
                 "missing.png,What?,no,train\na.png,What?,,train\n")
    src = read_source(SourceConfig(path=str(f), split="train"))
    assert [e.answer for e in src.examples] == ["yes"]
    assert [b.where for b in src.bad] == [f"{f}:4", f"{f}:5"]


def test_stage_registry_builtin_and_conflicts(monkeypatch):
    names = [s.name for s in stages.list_stages()]
    assert "sft" in names
    info = next(s for s in stages.list_stages() if s.name == "sft")
    assert info.plugin == "builtin" and info.distribution == "medgemma-train"

    class Plugin:
        @stages.hookimpl
        def medgemma_train_stages(self, register):
            register(stages.StageSpec(name="sft", description="again", prepare=print,
                                      loss=print))
            register(stages.StageSpec(name="mine", description="x", prepare=print, loss=print))

    class Broken:
        @stages.hookimpl
        def medgemma_train_stages(self, register):
            raise RuntimeError("boom")

    real = stages._plugins
    monkeypatch.setattr(stages, "_plugins", lambda: real() + [
        ("theirs", "their-dist", "1.0", Plugin), ("broken", "bad-dist", "0.1", Broken)])
    stages.registry(reload=True)
    try:
        assert "mine" in [s.name for s in stages.list_stages()]
        with pytest.raises(ValueError, match="medgemma-train .*their-dist"):
            stages.get_stage("sft")
        assert any(p.plugin == "broken" and "boom" in p.problem for p in stages.stage_problems())
    finally:
        monkeypatch.setattr(stages, "_plugins", real)
        stages.registry(reload=True)


def test_cli_user_mistakes_are_one_line_exit_2(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(_chat([{"messages": [{"role": "user", "content": "q"},
                                         {"role": "assistant", "content": "a"}]}]))
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text(data.read_text() + "{oops\n")
    cases = [
        (["sft", "--data", str(data), "--set", "optimizer.lrr=1"], "did you mean optimizer.lr"),
        (["sft", "--data", str(tmp_path / "none.jsonl"), "--checkpoint", str(tmp_path)],
         "none.jsonl not found"),
        (["sft", "--data", str(data), "--checkpoint", str(tmp_path / "nock")],
         "checkpoint"),
        (["sft", "--config", str(tmp_path / "no.yaml")], "no.yaml not found"),
        (["sft", "--data", str(corrupt), "--checkpoint", str(tmp_path)],
         f"{corrupt}:2: not JSON"),
        (["export", str(tmp_path), "--to", "hf", str(tmp_path / "o")], "not a medgemma-train run"),
    ]
    for argv, words in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
        assert "Traceback" not in err


def _source(name, n, weight):
    from medgemma_train.engine.data import Example, Source

    return Source(name, f"{name}.jsonl", "chat", weight,
                  tuple(Example(f"{name}:{i}") for i in range(n)), ())


def test_mixture_repeats_the_small_set_and_resumes_exactly():
    """A 4-row set mixed 1:3 with a 100-row set: a quarter of the rows come from it, each of
    its rows reappearing every epoch (it does not end the mixture); the iterator state
    restores to the same continuation."""
    from medgemma_train.engine.pipeline import Pipeline

    def encoder(rows, accum):
        return [r.where for r in rows]

    sources = [_source("small", 4, 1.0), _source("big", 100, 3.0)]
    pipe = Pipeline(sources, encoder, batch_size=8, accum=1, seed=0)
    steps = [next(pipe) for _ in range(25)]  # 200 rows
    rows = [r for s in steps for r in s]
    small = [r for r in rows if r.startswith("small")]
    assert len(small) == 50  # weight 1/4 of 200
    assert sorted(set(small)) == [f"small:{i}" for i in range(4)]
    assert all(small.count(f"small:{i}") in (12, 13) for i in range(4))
    state = pipe.get_state()
    ahead = [next(pipe) for _ in range(3)]
    again = Pipeline(sources, encoder, batch_size=8, accum=1, seed=0)
    again.set_state(state)
    assert [next(again) for _ in range(3)] == ahead
    other = Pipeline(sources, encoder, batch_size=8, accum=1, seed=1)
    assert [next(other) for _ in range(25)] != steps  # the seed shuffles


def test_rows_split_among_processes_and_micro_batches():
    from medgemma_train.engine.pipeline import Pipeline

    sources = [_source("a", 32, 1.0)]
    whole = Pipeline(sources, lambda rows, accum: [r.where for r in rows], batch_size=4,
                     accum=2, seed=0)
    parts = [Pipeline(sources, lambda rows, accum: [r.where for r in rows], batch_size=4,
                      accum=2, seed=0, process=p, processes=2) for p in range(2)]
    for _ in range(3):
        rows = next(whole)
        p0, p1 = next(parts[0]), next(parts[1])
        # micro-batch a holds rows a*4 .. a*4+3; process p its half of each
        assert p0 == rows[0:2] + rows[4:6] and p1 == rows[2:4] + rows[6:8]


def test_stage_settings_section_round_trips_and_names_bad_keys(tmp_path):
    import dataclasses

    import yaml

    from medgemma_train.engine.config import config_from_dict, to_dict

    @dataclasses.dataclass(frozen=True)
    class Mine:
        resolution: int = 448
        temperature_lr: float = 1.0

    f = tmp_path / "run.yaml"
    f.write_text("stage: mine\nmine:\n  resolution: 896\n")
    cfg = load_config(f, overrides=["mine.temperature_lr=0.5"], settings=Mine)
    assert cfg.options == Mine(resolution=896, temperature_lr=0.5)
    written = to_dict(cfg)
    assert written["mine"] == {"resolution": 896, "temperature_lr": 0.5}
    assert "options" not in written
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(written)), Mine)
    assert again == cfg
    with pytest.raises(ConfigError, match=r"unknown config key 'mine.resoluton'; did you mean "
                                          r"mine.resolution\?"):
        load_config(f, overrides=["mine.resoluton=1"], settings=Mine)
    # without the stage's settings class the section is an unknown key
    with pytest.raises(ConfigError, match="unknown config key 'mine'"):
        load_config(f)
    with pytest.raises(TypeError, match="settings must be a dataclass"):
        stages.StageSpec(name="x", description="x", prepare=print, loss=print, settings=dict)
