"""The ``rl`` stage: GRPO on text or image-text prompts, with its own loop (``StageSpec.run``).

Each step:

1. **Rollouts.** ``rl.prompts_per_step`` prompts (rows of the training data without their
   last assistant turn; that turn, or the row's answer, is the gold answer) are each sampled
   ``rl.group_size`` (G) times from the current policy by medgemma-core's batched sampler
   (:class:`medgemma_core.Engine`: one compiled prefill and decode loop for all ``P*G``
   rows). Images go through the policy's own vision tower and projector into the prompt
   embeddings, as :class:`medgemma_core.PromptEncoder` builds them.
2. **Rewards.** The plugins named in ``rl.rewards`` (:mod:`medgemma_train.engine.rewards`),
   weighted by ``rl.reward_weights``, score each completion.
3. **Advantages.** Per group, ``A = (r - mean) / (std + adv_eps)``; a group whose rewards are
   all equal gets ``A = 0`` (not NaN), so it contributes no policy gradient.
4. **Reference forward.** Log-probabilities of the sampled tokens under the frozen reference
   (also when ``beta = 0``, so that the KL is logged). A LoRA policy's reference is the same model with its adapters
   disabled (the adapter parameters replaced by zeros, which adds exactly 0): it shares the
   base weights, nothing is copied. Otherwise the reference is a frozen copy of the starting
   trainable parameters.
5. **Update.** ``rl.updates_per_rollout`` optimizer steps on the objective (DeepSeekMath's
   GRPO) per completion token ``t`` of rollout ``i``::

       ratio = exp(logp - logp_old)
       L_it  = -[min(ratio * A_i, clip(ratio, 1 - eps, 1 + eps) * A_i) - beta * k3_it]
       k3_it = exp(logp_ref - logp) - (logp_ref - logp) - 1      (>= 0, unbiased for KL)

   aggregated **per sequence, then per token**: ``loss = mean_i (1/|o_i|) sum_t L_it``
   (every rollout weighs the same whatever its length). ``logp_old`` is the policy that
   sampled (the value of ``logp`` itself on the first update).

Limits: one process, the default device placement (no mesh), no ``--resume`` and no
validation pass yet (``data.eval`` is not read).

The run folder holds ``config.yaml``, ``metrics.jsonl`` (reward mean, KL, clip fraction, and
the seconds of rollout, reference forward and update per step), ``rollouts.jsonl`` (prompt,
completion, reward, advantage of every rollout), TensorBoard events and the final checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from . import sft
from .stages import StageSpec, hookimpl

__all__ = ["RL", "RLSettings", "advantages", "grpo_loss", "token_logprobs", "run"]


@dataclasses.dataclass(frozen=True)
class RLSettings:
    """GRPO settings (the ``rl:`` config section). ``group_size``: G samples per prompt;
    ``epsilon``: the ratio clip; ``beta``: the KL penalty's weight; ``rewards``: reward plugin
    names (``medgemma-train rewards`` lists them) and their ``reward_weights`` (default 1);
    sampling: ``temperature``, ``top_k``, ``top_p``; ``max_new_tokens`` per completion."""

    group_size: int = 8
    prompts_per_step: int = 4
    epsilon: float = 0.2
    beta: float = 0.04
    rewards: tuple[str, ...] = ("exact",)
    reward_weights: tuple[float, ...] = ()
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    updates_per_rollout: int = 1
    adv_eps: float = 1e-4
    log_rollouts: bool = True

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError("rl.group_size must be at least 2 (advantages are group-relative)")
        if self.prompts_per_step < 1 or self.updates_per_rollout < 1 or self.max_new_tokens < 1:
            raise ValueError("rl.prompts_per_step, rl.updates_per_rollout and "
                             "rl.max_new_tokens must be at least 1")
        if self.epsilon <= 0 or self.beta < 0 or self.temperature <= 0:
            raise ValueError("rl.epsilon and rl.temperature must be positive, rl.beta >= 0")


# ---- the math --------------------------------------------------------------------------------
def advantages(rewards: np.ndarray, group_size: int, eps: float = 1e-4) -> np.ndarray:
    """``[P*G]`` rewards (groups contiguous) -> group-normalised advantages; a group whose
    rewards are all equal gets exactly 0."""
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)
    mean, std = r.mean(1, keepdims=True), r.std(1, keepdims=True)
    flat = np.ptp(r, axis=1, keepdims=True) == 0
    return np.where(flat, 0.0, (r - mean) / (std + eps)).reshape(-1).astype(np.float32)


def token_logprobs(model: Any, batch: Any, *, chunk: int = 512) -> jax.Array:
    """``[B, T-1]`` log-probability of each next token ``labels[:, 1:]`` (0 where no label),
    ``chunk`` tokens projected onto the vocabulary at a time (rematerialised)."""
    from medgemma_core.training import forward_hidden

    h = forward_hidden(model, batch)
    dec = getattr(model, "decoder", model)
    table, cap = dec.embedding[...], dec.config.final_logit_softcapping
    b, t = h.shape[0], h.shape[1] - 1
    hs = h[:, :-1].reshape(b * t, -1)
    targets = jnp.maximum(jnp.asarray(batch.labels, jnp.int32)[:, 1:].reshape(-1), 0)
    n = hs.shape[0]
    c = max(1, min(int(chunk), n))
    pad = -n % c
    hs = jnp.pad(hs, ((0, pad), (0, 0))).reshape(-1, c, hs.shape[-1])
    tg = jnp.pad(targets, (0, pad)).reshape(-1, c)

    @jax.checkpoint
    def one(x, y, tbl):
        logits = jnp.einsum("nd,vd->nv", x, tbl.astype(x.dtype),
                            preferred_element_type=jnp.float32)
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        return jnp.take_along_axis(logits, y[:, None], -1)[:, 0] - jax.nn.logsumexp(logits, -1)

    out = jax.lax.map(lambda xs: one(xs[0], xs[1], table), (hs, tg)).reshape(-1)[:n]
    valid = jnp.asarray(batch.labels)[:, 1:] >= 0
    return jnp.where(valid, out.reshape(b, t), 0.0)


def grpo_loss(logp: jax.Array, old: jax.Array, ref: jax.Array, adv: jax.Array,
              mask: jax.Array, *, epsilon: float, beta: jax.Array) -> tuple[jax.Array, dict]:
    """The module docstring's objective from ``[B, T-1]`` log-probs (``mask``: completion
    tokens) and ``[B]`` advantages: ``(loss, metrics)``."""
    mask = mask.astype(jnp.float32)
    ratio = jnp.exp(logp - old)
    a = adv[:, None]
    surrogate = jnp.minimum(ratio * a, jnp.clip(ratio, 1 - epsilon, 1 + epsilon) * a)
    d = ref - logp
    k3 = jnp.exp(d) - d - 1.0
    per_token = -(surrogate - beta * k3)
    lengths = jnp.maximum(mask.sum(1), 1.0)
    per_seq = (per_token * mask).sum(1) / lengths
    has = (mask.sum(1) > 0).astype(jnp.float32)
    n_seq = jnp.maximum(has.sum(), 1.0)
    loss = (per_seq * has).sum() / n_seq
    clipped = (jnp.abs(ratio - 1.0) > epsilon).astype(jnp.float32)
    tokens = jnp.maximum(mask.sum(), 1.0)
    return loss, {"kl": (k3 * mask).sum() / tokens, "clip_frac": (clipped * mask).sum() / tokens}


# ---- rollouts --------------------------------------------------------------------------------
@dataclasses.dataclass
class Prompt:
    messages: list
    gold: str
    meta: dict


def _prompts(examples: list, image_text: bool, system: str = "") -> list[Prompt]:
    from .pipeline import Encoder

    out = []
    strip = Encoder(None, seq_len=1, slots=1 if image_text else 0, image_text=image_text,
                    system=system)
    for ex in examples:
        msgs = strip.messages(ex)
        gold = ex.answer
        if msgs and msgs[-1]["role"] == "assistant":
            last = msgs.pop()["content"]
            gold = last if isinstance(last, str) else " ".join(
                i.get("text", "") for i in last if i.get("type") == "text")
        out.append(Prompt(msgs, gold, {"where": ex.where}))
    return out


class Roller:
    """Samples ``G`` completions per prompt from the current policy (the engine's compiled
    loop), images through the policy's own vision tower."""

    def __init__(self, model: Any, processor: Any, image_text: bool, slots: int):
        from medgemma_core import Engine

        self.processor, self.image_text, self.slots = processor, image_text, slots
        tok = processor.tokenizer
        self.stop_ids = sorted(tok.stop_ids)
        self.engine = Engine(model.decoder if image_text else model, stop_ids=self.stop_ids,
                             pad_id=tok.pad_id)
        if image_text:
            from medgemma_core.multimodal import image_blocks

            self._blocks = image_blocks
            self._graphdef = nnx.graphdef(model)
            self._embed = jax.jit(lambda st, tokens, px, mask: self._embeddings(st, tokens, px,
                                                                                mask))

    def _embeddings(self, state, tokens, pixels, image_mask):
        m = nnx.merge(self._graphdef, state)
        b, n = pixels.shape[:2]
        soft = m.encode_images(pixels.reshape(b * n, *pixels.shape[2:]))
        # rows hold their images in slots; a row's unused slots come last and are never read
        keep = image_mask.reshape(-1)
        order = jnp.argsort(~keep, stable=True)
        return m.embed(tokens, soft[order])

    def refresh(self, model: Any) -> None:
        """Point the sampler at the policy's current weights (no recompile)."""
        self.engine.state = nnx.state(model.decoder if self.image_text else model)
        self.state = nnx.state(model)

    def __call__(self, prompts: list[Prompt], group: int, settings: RLSettings,
                 seed: int) -> tuple[list[Any], list[list[int]], list[bool]]:
        from medgemma_core import Sampling

        processed = [self.processor(p.messages, add_generation_prompt=True) for p in prompts]
        rows = [p for p in processed for _ in range(group)]
        ids = [list(p.input_ids) for p in rows]
        emb = blocks = None
        if self.image_text:
            t = max(len(r) for r in ids)
            tokens = np.zeros((len(ids), t), np.int32)
            for r, row in enumerate(ids):
                tokens[r, t - len(row):] = row
            pixels, mask = _slots(rows, self.slots)
            emb = self._embed(self.state, jnp.asarray(tokens), jnp.asarray(pixels),
                              jnp.asarray(mask))
            blocks = self._blocks(jnp.asarray(tokens), self.processor.image_token_id)
        sampling = Sampling(temperature=settings.temperature, top_k=settings.top_k,
                            top_p=settings.top_p, seed=seed)
        gen = self.engine.generate(ids, max_new_tokens=settings.max_new_tokens,
                                   sampling=sampling, embeddings=emb, image_id=blocks)
        return rows, gen.token_ids, gen.stopped


def _slots(rows: list[Any], slots: int) -> tuple[np.ndarray, np.ndarray]:
    size = next((r.pixel_values.shape[1:] for r in rows if len(r.pixel_values)), (0, 0, 3))
    pixels = np.zeros((len(rows), max(slots, 1), *size), np.float32)
    mask = np.zeros((len(rows), max(slots, 1)), bool)
    for i, r in enumerate(rows):
        n = len(r.pixel_values)
        pixels[i, :n] = r.pixel_values
        mask[i, :n] = True
    return pixels, mask


def _text(tokenizer: Any, ids: list[int], stops: list[int]) -> str:
    """The completion's text: stop tokens dropped, and ids past the tokenizer's pieces (the
    embedding table is padded beyond them) skipped."""
    n = tokenizer.vocab_size
    return tokenizer.decode([t for t in ids if t not in stops and 0 <= t < n])


def rollout_batch(rows: list[Any], completions: list[list[int]], seq_len: int, slots: int,
                  image_text: bool, pad_id: int) -> Any:
    """Prompt + completion per rollout, right-padded to ``seq_len``: a TrainBatch whose
    labels are the completion tokens (prompt and padding: -100)."""
    from medgemma_core.training import IGNORE_INDEX, TrainBatch

    b = len(rows)
    tokens = np.full((b, seq_len), pad_id, np.int32)
    labels = np.full((b, seq_len), IGNORE_INDEX, np.int32)
    attn = np.zeros((b, seq_len), np.int32)
    for i, (r, c) in enumerate(zip(rows, completions)):
        p = list(r.input_ids)
        if len(p) + len(c) > seq_len:
            raise ValueError(f"a prompt of {len(p)} tokens + {len(c)} generated exceed "
                             f"data.seq_len={seq_len}; raise data.seq_len")
        tokens[i, :len(p) + len(c)] = p + list(c)
        labels[i, len(p):len(p) + len(c)] = c
        attn[i, :len(p) + len(c)] = 1
    if not image_text:
        return TrainBatch(tokens, labels, attn)
    pixels, mask = _slots(rows, slots)
    return TrainBatch(tokens, labels, attn, pixels, mask)


# ---- the loop --------------------------------------------------------------------------------
def reference_params(params: Any) -> Any:
    """The reference's trainable part: adapters zeroed (disabled: the base weights, held in the
    frozen ``rest``, are shared), every other trainable parameter a frozen copy."""
    def one(v: Any) -> Any:
        if isinstance(v, nnx.LoRAParam):
            return v.replace(value=jnp.zeros_like(v.get_value()))
        if isinstance(v, nnx.Variable):
            return v.replace(value=jnp.array(v.get_value(), copy=True))
        return v

    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def run(cfg: Any, stage: StageSpec, *, dry_run: bool = False, say: Any = None) -> dict:
    """The GRPO loop (module docstring); returns the summary (``model``: the trained policy)."""
    from .config import to_dict
    from .data import DataError, check_bad_rows, read_source
    from .mesh import initialize
    from .metrics import MetricsWriter
    from .rewards import Sample, get_reward, score
    from .step import make_optimizer, warmup_steps
    from .trainer import TrainError

    say = say or (lambda text: None)
    s: RLSettings = cfg.options or RLSettings()
    _, processes = initialize()
    if processes > 1:
        raise TrainError("rl: one process for now (the rollouts are not yet split among "
                         "processes); run on one host")
    if cfg.run.resume:
        raise TrainError("rl: --resume is not supported yet; start a new run from the last "
                         "checkpoint's export")
    if cfg.optimizer.grad_accum != 1:
        raise TrainError("rl: optimizer.grad_accum must be 1 (a step is one rollout batch)")
    for name in s.rewards:
        try:
            get_reward(name)
        except ValueError as exc:
            raise TrainError(str(exc)) from None
    if not cfg.data.train:
        raise DataError("no training data; pass --data FILE or set data.train")
    sources = [read_source(src, i) for i, src in enumerate(cfg.data.train)]
    check_bad_rows(sources, skip_bad=cfg.data.skip_bad)
    examples = [ex for src in sources for ex in src.examples]
    try:
        prepared = sft.prepare(cfg)
    except (ValueError, FileNotFoundError) as exc:
        raise TrainError(str(exc)) from None
    model, image_text = prepared.model, prepared.image_text
    prompts = _prompts(examples, image_text, cfg.data.system)
    slots = max([1] + [ex.images for ex in examples]) if image_text else 0
    total = cfg.run.max_steps or max(1, math.ceil(cfg.run.epochs * len(prompts)
                                                  / s.prompts_per_step))
    from .pipeline import mixture_table

    def count(state: Any) -> int:
        return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(state)))

    plan = {"stage": "rl", "params": count(nnx.state(model, nnx.Param)),
            "trainable": count(nnx.state(model, prepared.trainable)), "steps": total,
            "steps_per_epoch": max(1, math.ceil(len(prompts) / s.prompts_per_step)),
            "rows_per_step": s.prompts_per_step,
            "warmup_steps": warmup_steps(cfg.optimizer, total * s.updates_per_rollout),
            "mesh": {"devices": 1},
            "processes": 1, "mixture": mixture_table(sources, s.prompts_per_step, total),
            "eval_rows": 0, "bad_rows": 0, "prompts": len(prompts),
            "group_size": s.group_size, "rollouts_per_step": s.group_size * s.prompts_per_step,
            "rewards": list(s.rewards)}
    if dry_run:
        return plan
    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    import yaml

    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tx, schedule = make_optimizer(cfg.optimizer, total * s.updates_per_rollout)
    model.eval()
    graphdef, params, rest = nnx.split(model, prepared.trainable, ...)
    # committed to one device from the start: the second step then reuses the first's compiles
    params, rest = jax.device_put((params, rest), jax.sharding.SingleDeviceSharding(
        jax.devices()[0]))
    nnx.update(model, params, rest)
    reference = reference_params(params)
    opt_state = jax.jit(tx.init)(params)
    roller = Roller(model, prepared.processor, image_text, slots)
    chunk = cfg.model.loss_chunk

    def logprobs(p, r, batch):
        return token_logprobs(nnx.merge(graphdef, p, r, copy=True), batch, chunk=chunk)

    ref_forward = jax.jit(logprobs)
    old_forward = jax.jit(logprobs)

    def objective(p, r, batch, adv, old, ref, beta):
        lp = logprobs(p, r, batch)
        old = jax.lax.stop_gradient(lp) if old is None else old
        mask = jnp.asarray(batch.labels)[:, 1:] >= 0
        return grpo_loss(lp, old, ref, adv, mask, epsilon=s.epsilon, beta=beta)

    @jax.jit
    def update(p, o, step, r, batch, adv, old, ref, beta):
        (loss, m), g = jax.value_and_grad(objective, has_aux=True)(p, r, batch, adv, old, ref,
                                                                    beta)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, {"loss": loss, "grad_norm": optax.global_norm(
            g), "lr": schedule(step), **m}

    writer = MetricsWriter(out, total_steps=total, tensorboard=cfg.run.tensorboard,
                           progress=cfg.run.progress)
    log = open(out / "rollouts.jsonl", "w", encoding="utf-8") if s.log_rollouts else None  # noqa: SIM115
    rng = np.random.default_rng(cfg.data.seed)
    order: list[int] = []
    history: list[dict] = []
    beta = jnp.float32(s.beta)
    tokenizer = prepared.processor.tokenizer
    try:
        for step in range(total):
            if len(order) < s.prompts_per_step:
                order += list(rng.permutation(len(prompts)))
            chosen = [prompts[i] for i in order[:s.prompts_per_step]]
            del order[:s.prompts_per_step]
            t0 = time.perf_counter()
            nnx.update(model, params)
            roller.refresh(model)
            rows, completions, stopped = roller(chosen, s.group_size, s, cfg.run.seed + step)
            texts = [_text(tokenizer, c, roller.stop_ids) for c in completions]
            samples = [Sample(prompt=json.dumps(p.messages, default=str)[:2000],
                              completion=x, gold=p.gold, stopped=st, meta=p.meta)
                       for p, x, st in zip([p for p in chosen for _ in range(s.group_size)],
                                           texts, stopped)]
            rewards, parts = score(samples, s.rewards, s.reward_weights)
            adv = advantages(np.asarray(rewards), s.group_size, s.adv_eps)
            batch = rollout_batch(rows, completions, cfg.data.seq_len, slots, image_text,
                                  tokenizer.pad_id)
            t1 = time.perf_counter()
            ref = jax.block_until_ready(ref_forward(reference, rest, batch))  # also beta=0: kl
            t2 = time.perf_counter()
            old = old_forward(params, rest, batch) if s.updates_per_rollout > 1 else None
            for k in range(s.updates_per_rollout):
                params, opt_state, m = update(params, opt_state,
                                              step * s.updates_per_rollout + k, rest, batch,
                                              jnp.asarray(adv), old, ref, beta)
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            t3 = time.perf_counter()
            gen_tokens = int(sum(len(c) for c in completions))
            values = {**m, "reward": float(np.mean(rewards)),
                      **{f"reward_{k}": float(np.mean(v)) for k, v in parts.items()},
                      "zero_variance_groups": int(np.sum(np.ptp(np.reshape(
                          rewards, (-1, s.group_size)), axis=1) == 0)),
                      "completion_tokens": gen_tokens, "rollout_s": t1 - t0,
                      "reference_s": t2 - t1, "update_s": t3 - t2,
                      "rollout_tokens_per_s": gen_tokens / max(t1 - t0, 1e-9)}
            writer.advance()
            writer.write(step + 1, values)
            history.append({"step": step + 1, **values})
            if log is not None:
                for smp, r, a in zip(samples, rewards, adv):
                    log.write(json.dumps({"step": step + 1, "prompt": smp.prompt,
                                          "completion": smp.completion, "gold": smp.gold,
                                          "reward": r, "advantage": float(a)}) + "\n")
    finally:
        writer.close()
        if log is not None:
            log.close()
    nnx.update(model, params)
    from .checkpoint import Checkpoints

    ckpt = Checkpoints(out / "checkpoints", keep_last=cfg.run.keep_last, keep_best=0)
    ckpt.save(total, params, opt_state, {"step": total, "stage": "rl",
                                         "base_checkpoint": cfg.model.checkpoint,
                                         "config": to_dict(cfg), "metrics": {}}, wait=True)
    ckpt.close()
    summary = {"stage": "rl", "steps": total, "run": str(out), "plan": plan,
               "first_reward": history[0]["reward"], "final_reward": history[-1]["reward"],
               "final_train_loss": history[-1]["loss"], "final_eval_loss": None,
               "history": history, "reference": reference, "rest": rest}
    if stage.finish is not None:
        summary["exports"] = stage.finish(model, prepared, cfg, out)
    summary["model"] = model
    return summary


def _loss(model: Any, batch: Any, cfg: Any) -> Any:
    raise NotImplementedError("the rl stage runs its own loop (StageSpec.run); see grpo_loss")


def _finish(model: Any, prepared: Any, cfg: Any, run_dir: Path) -> dict:
    return sft.finish(model, prepared, cfg, run_dir)


RL = StageSpec(
    name="rl",
    description="GRPO: G sampled completions per prompt (images included), group-normalised "
                "rewards from reward plugins, clipped ratio + k3 KL to a frozen reference",
    prepare=sft.prepare,
    loss=_loss,
    finish=_finish,
    settings=RLSettings,
    run=run,
    defaults={"optimizer.lr": 1e-5, "optimizer.max_grad_norm": 1.0, "optimizer.warmup_ratio":
              0.0, "optimizer.decay": "constant"},
)


@hookimpl
def medgemma_train_stages(register: Any) -> None:
    register(RL)
