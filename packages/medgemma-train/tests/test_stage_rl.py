"""The ``rl`` stage (GRPO), fast checks on a tiny text model: advantages by hand, a
zero-variance group's zero gradient, a reward plugin installed as a package (entry point),
and a LoRA policy whose reference shares the base weights, bitwise unchanged.

The image task (reward from chance to >= 0.8, shuffled images at chance, the KL bound) is in
test_stage_rl_image.py (slow).
"""

from __future__ import annotations

import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_fixtures import chat_rows, tiny_text_checkpoint, write_jsonl

from medgemma_core.checkpoints.export import load_any
from medgemma_train.engine import rewards
from medgemma_train.engine.config import load_config
from medgemma_train.engine.rl import advantages, grpo_loss, rollout_batch, token_logprobs
from medgemma_train.engine.stages import get_stage
from medgemma_train.engine.trainer import train


def test_advantages_by_hand():
    r = np.array([1.0, 0.0, 0.0, 1.0, 0.7, 0.7, 0.7, 0.7, 2.0, 0.0, 1.0, 1.0])
    a = advantages(r, 4, eps=1e-4)
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a[:4], np.array([1, -1, -1, 1]) * 0.5 / (0.5 + 1e-4), rtol=1e-6)
    assert np.all(a[4:8] == 0.0)  # zero variance: exactly 0, not NaN
    std = np.std([2.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(a[8:], (np.array([2.0, 0, 1, 1]) - 1.0) / (std + 1e-4),
                               rtol=1e-6)


def test_grpo_loss_by_hand():
    """Per sequence, then per token: mean_i (1/|o_i|) sum_t L_it; k3 on the reference."""
    logp = jnp.array([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    old = jnp.array([[-1.2, -1.0, 0.0], [-0.5, 0.0, 0.0]])
    ref = jnp.array([[-1.1, -2.5, 0.0], [-0.4, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    adv = jnp.array([1.0, -2.0])
    fn = jax.jit(grpo_loss, static_argnames=("epsilon",))  # one compile, not one per op
    loss, m = fn(logp, old, ref, adv, mask, epsilon=0.2, beta=jnp.float32(0.1))

    def tok(lp, o, rf, a):
        ratio = np.exp(lp - o)
        sur = min(ratio * a, np.clip(ratio, 0.8, 1.2) * a)
        k3 = np.exp(rf - lp) - (rf - lp) - 1
        return -(sur - 0.1 * k3), k3

    l1 = [tok(-1.0, -1.2, -1.1, 1.0), tok(-2.0, -1.0, -2.5, 1.0)]
    l2 = [tok(-0.5, -0.5, -0.4, -2.0)]
    want = ((l1[0][0] + l1[1][0]) / 2 + l2[0][0]) / 2
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    np.testing.assert_allclose(float(m["kl"]), (l1[0][1] + l1[1][1] + l2[0][1]) / 3, rtol=1e-5)


@pytest.fixture(scope="module")
def text_ck(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    return root, tiny_text_checkpoint(root / "ck", layers=1)  # one layer: shorter compiles


def test_zero_variance_group_gives_zero_gradient(text_ck):
    """Group A's rewards are all equal: its rows add nothing to the gradient (beta = 0)."""
    from test_stage_distill import _processor

    _, ck = text_ck
    model = load_any(ck, "float32")
    proc = _processor()
    rows = [proc([{"role": "user", "content": f"What comes after {k}?"}],
                 add_generation_prompt=True) for k in (3, 3, 7, 7)]
    comp = [[300, 301, 1], [305, 1], [310, 311, 312], [320, 1]]
    batch = rollout_batch(rows, comp, 32, 0, False, 0)
    adv = jnp.asarray(advantages(np.array([1.0, 1.0, 0.0, 1.0]), 2))
    assert np.all(np.asarray(adv[:2]) == 0) and np.all(np.asarray(adv[2:]) != 0)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p, b, a):
        lp = token_logprobs(nnx.merge(graphdef, p), b, chunk=16)
        mask = jnp.asarray(b.labels)[:, 1:] >= 0
        return grpo_loss(lp, jax.lax.stop_gradient(lp), lp, a, mask, epsilon=0.2,
                         beta=jnp.float32(0.0))[0]

    grad = jax.jit(jax.grad(loss))
    only_a = grad(params, jax.tree.map(lambda x: x[:2], batch), adv[:2])
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(only_a))
    full = grad(params, batch, adv)
    only_b = grad(params, jax.tree.map(lambda x: x[2:], batch), adv[2:])
    for f, b in zip(jax.tree.leaves(full), jax.tree.leaves(only_b)):
        np.testing.assert_allclose(2 * np.asarray(f), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(only_b)) > 0


PLUGIN = '''
from medgemma_train.engine.rewards import RewardSpec, hookimpl


def starts_early(sample):
    """1 when the completion's first letter is in a..m."""
    text = sample.completion.strip().lower()
    return float(bool(text) and "a" <= text[0] <= "m")


@hookimpl
def medgemma_train_rewards(register):
    register(RewardSpec(name="starts_early", description="first letter a..m", fn=starts_early))
'''


@pytest.fixture()
def reward_package(tmp_path, monkeypatch):
    """A package installed on sys.path with an entry point in medgemma.train_rewards."""
    site = tmp_path / "site"
    (site / "rlplug").mkdir(parents=True)
    (site / "rlplug" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "rlplug-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rlplug\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[medgemma.train_rewards]\nrlplug = rlplug\n")
    monkeypatch.syspath_prepend(str(site))
    rewards.registry(reload=True)
    yield
    monkeypatch.undo()
    rewards.registry(reload=True)


def test_reward_plugin_and_lora_reference(text_ck, reward_package, tmp_path):
    """The package's reward is listed and scores the rollouts; the LoRA policy moves while its
    reference (the adapters disabled) shares the base weights, bitwise unchanged."""
    names = {n: who for n, _, who in rewards.list_rewards()}
    assert names["starts_early"] == "rlplug (rlplug)" and "exact" in names
    root, ck = text_ck
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(8))
    stage = get_stage("rl")
    cfg = load_config(base={
        "stage": "rl", "model": {"checkpoint": str(ck)},
        "data": {"train": [str(data)], "seq_len": 40},
        "lora": {"rank": 4, "dropout": 0.0},
        "optimizer": {"lr": 1e-2, "warmup_ratio": 0.0, "decay": "constant"},
        "run": {"out": str(tmp_path / "run"), "max_steps": 3, "progress": False,
                "tensorboard": False},
        "rl": {"rewards": ["starts_early"], "group_size": 4, "prompts_per_step": 2,
               "max_new_tokens": 4, "beta": 0.1}}, settings=stage.settings)
    out = train(cfg, stage)
    logged = [json.loads(line) for line in (tmp_path / "run" / "rollouts.jsonl").open()]
    assert len(logged) == 3 * 8
    import rlplug

    for r in logged:
        want = rlplug.starts_early(rewards.Sample("", r["completion"], r["gold"]))
        assert r["reward"] == want
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert all({"rollout_s", "reference_s", "update_s", "kl", "reward"} <= set(m)
               for m in metrics)

    # the reference: only the adapters (zeros), the base weights are the shared `rest`
    ref = nnx.to_flat_state(out["reference"])
    assert ref and all(isinstance(v, nnx.LoRAParam) for _, v in ref)
    assert all(np.all(np.asarray(v.get_value()) == 0) for _, v in ref)
    base = dict(nnx.to_flat_state(nnx.state(load_any(ck, "float32"), nnx.Param)))
    rest = {p: v for p, v in nnx.to_flat_state(out["rest"]) if isinstance(v, nnx.Param)}
    assert set(rest) == set(base)
    for path, v in rest.items():
        assert np.array_equal(np.asarray(v.get_value()), np.asarray(base[path].get_value()))
    moved = [p for p, v in nnx.to_flat_state(nnx.state(out["model"], nnx.LoRAParam))
             if np.any(np.asarray(v.get_value()) != 0) and p[-1] == "b"]
    assert moved  # the policy's adapters trained


def test_builtin_rewards_by_hand(capsys):
    from medgemma_train.cli import main

    def r(name, completion, gold, stopped=True, **meta):
        return rewards.get_reward(name).fn(rewards.Sample("", completion, gold, stopped, meta))

    opts = {"A": "aspirin", "B": "heparin", "C": "warfarin", "D": "alteplase"}
    assert r("letter", "The answer is (C).", "C", options=opts) == 1.0
    assert r("letter", "heparin", "B", options=opts) == 1.0
    assert r("letter", "I am not sure", "B", options=opts) == 0.0
    assert r("exact", "The pneumothorax.", "pneumothorax") == 1.0
    assert r("exact", "left pneumothorax", "pneumothorax") == 0.0
    assert r("token_f1", "small left pleural effusion", "left pleural effusion") == (
        2 * (3 / 4) * 1.0 / (3 / 4 + 1.0))
    # predicted {effusion, cardiomegaly} vs gold {effusion, edema}: F1 = 2*1 / (2 + 2)
    assert r("cxr_f1", "Pleural effusion and cardiomegaly; no pneumothorax.",
             "pleural effusion, edema") == 0.5
    assert r("cxr_f1", "No acute findings.", "normal study") == 1.0  # both empty
    assert r("format", "Red", "red") == 1.0
    assert r("format", "Red", "red", stopped=False) == 0.0
    assert r("format", "Red\nGreen", "red") == 0.0
    assert r("format", "<unused94>thinking without end", "red") == 0.0
    total, parts = rewards.score([rewards.Sample("", "Red", "red")], ["exact", "format"],
                                 [0.5, 2.0])
    assert total == [2.5] and parts == {"exact": [1.0], "format": [1.0]}
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        rewards.get_reward("nope")
    assert main(["rewards", "--json"]) == 0
    listed = {json.loads(line)["name"] for line in capsys.readouterr().out.splitlines()}
    assert {"letter", "exact", "token_f1", "cxr_f1", "format"} <= listed


def test_cli_dry_runs_and_one_line_mistakes(text_ck, tmp_path, capsys):
    from medgemma_train.cli import main

    _, ck = text_ck
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(12))
    base = ["--checkpoint", str(ck), "--data", str(data), "--out", str(tmp_path / "run")]
    assert main(["rl", *base, "--dry-run", "--json", "--set", "rl.prompts_per_step=3"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["steps"] == 4 and plan["rollouts_per_step"] == 24 and plan["trainable"] > 0
    assert main(["distill", *base, "--dry-run", "--set", f"distill.teacher={ck}"]) == 0
    assert "stage distill" in capsys.readouterr().out
    for args, message in (
            (["rl", *base, "--set", "rl.rewards=[nope]"], "unknown reward 'nope'"),
            (["rl", *base, "--set", "rl.alpha=1"], "did you mean rl.adv_eps"),
            (["rl", *base, "--set", "rl.group_size=1"], "rl.group_size must be at least 2"),
            (["distill", *base], "distill: no teacher"),
            (["distill", *base, "--set", "distill.alpha=2"], "distill.alpha=2.0")):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
