"""int8 weights (medgemma_core.quant): logits against a numpy quantization of the same weights
and against float32, no float32 copy of a weight in the compiled program, Q8_0 GGUF files
loaded as they are stored, quantized Orbax folders, the command's --quantize."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medgemma_core import quant
from medgemma_core.checkpoints import load_decoder, save_decoder
from medgemma_core.checkpoints.names import text_specs
from medgemma_core.config import Gemma3Config
from medgemma_core.transformer import Gemma3, KVCache
from medsiglip.weights import MappingSource, abstract_module, fill

CFG = Gemma3Config.tiny(vocab_size=384)
# f32 vs int8 on these random weights: the largest logit error, relative to the largest logit
F32_TOLERANCE = 0.06
_LLAMA_CPP = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def hf_tensors(cfg: Gemma3Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights under Hugging Face names and layouts ([out, in]), with a few outliers."""
    rng = np.random.default_rng(seed)
    specs = text_specs(cfg)
    out = {}
    for spec in specs:
        if spec.name in out:
            continue
        if spec.name.endswith("norm.weight"):
            out[spec.name] = rng.normal(0, 0.1, spec.shape).astype(np.float32)
            continue
        w = rng.normal(0, 0.05, spec.shape).astype(np.float32)
        w.reshape(-1)[rng.integers(0, w.size, 8)] *= 6  # outliers stretch their scales
        out[spec.name] = w
    return out


# the scale search's candidates, as its definition lists them: scale = max|w| / k
SEARCH_K = [127, *range(126, 63, -1), *range(128, 161, 2)]


def numpy_fake_quant(w: np.ndarray, group: int, search: bool = False) -> np.ndarray:
    """The reference: ``w`` [out, in] quantized per row (group 0) or per block of ``group``
    along a row, symmetric int8 (scale = max|w| / 127, q = round(w / scale), both in float32
    as the definition says), and back to float64. ``search``: each block's scale is the
    max|w| / k (k in SEARCH_K, the first on a tie) with the least sum of squared errors."""
    w = w.astype(np.float32)
    blocks = w.reshape(w.shape[0], -1, group if group else w.shape[1])
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    scale = amax / np.float32(127)
    if search:
        ks = np.asarray(SEARCH_K, np.float32)[:, None, None, None]
        cand = np.where(amax > 0, amax, np.float32(1))[None] / ks  # [K, out, n, 1]
        q = np.clip(np.round(blocks[None] / cand), -127, 127)
        err = ((blocks[None] - cand * q) ** 2).sum(-1)  # [K, out, n]
        scale = amax / np.asarray(SEARCH_K, np.float32)[err.argmin(0)][..., None]
    scale = np.where(amax == 0, np.float32(1), scale)
    q = np.clip(np.round(blocks / scale), -127, 127)
    return (q.astype(np.float64) * scale.astype(np.float64)).reshape(w.shape)


def float_model(tensors, cfg=CFG) -> Gemma3:
    abstract = abstract_module(lambda rngs: Gemma3(cfg, rngs=rngs))
    return fill(abstract, MappingSource(tensors), text_specs(cfg))


def int8_model(tensors, mode, cfg=CFG) -> Gemma3:
    abstract = quant.abstract_quantized(lambda rngs: Gemma3(cfg, rngs=rngs), mode)
    return fill(abstract, MappingSource(tensors), quant.quantized_specs(text_specs(cfg), mode))


def ids(n=20, b=2, seed=1):
    return jnp.asarray(np.random.default_rng(seed).integers(3, CFG.vocab_size, (b, n)))


@nnx.jit
def forward(model, tokens):
    return model(tokens)[0]


@nnx.jit(static_argnames="steps")
def decode_logits(model, tokens, steps=3):
    """Prefill then ``steps`` cached one-token steps (the decode path): logits of each."""
    cache = KVCache.create(model.config, tokens.shape[0], 64, jnp.zeros((tokens.shape[0],)))
    out, cache = model(tokens[:, :-steps], cache=cache)
    outs = [out[:, -1]]
    for i in range(steps, 0, -1):
        o, cache = model(tokens[:, -i:][:, :1], cache=cache)
        outs.append(o[:, -1])
    return jnp.stack(outs, 1)


@pytest.mark.parametrize("mode", ["int8", "int8-g32", "int8-mse", "int8-g32-mse-ftable"])
def test_logits_equal_a_numpy_quantization_and_stay_near_float32(mode, monkeypatch):
    sch = quant.MODES[mode]
    tensors = hf_tensors(CFG)

    def fake(name, v):
        group = sch.table if name == "embed_tokens.weight" else sch.group
        if name.endswith("norm.weight") or group is None:
            return v
        return numpy_fake_quant(v, group, sch.search).astype(np.float32)

    fake = {k: fake(k, v) for k, v in tensors.items()}
    reference = float_model(fake)
    want_full, want_step = np.asarray(forward(reference, ids())), np.asarray(
        decode_logits(reference, ids()))
    loaded = int8_model(tensors, mode)  # quantized while loading
    in_place = quant.quantize(float_model(tensors), mode)  # quantized after
    # one product per weight, and chunked loops over the weights (the CPU path of big ones)
    for model, chunk in ((loaded, quant.CHUNK_BYTES), (in_place, 512)):
        monkeypatch.setattr(quant, "CHUNK_BYTES", chunk)
        assert isinstance(model.layers[0].attn.o, quant.QWeight)
        assert model.layers[0].mlp.down.values[...].dtype == jnp.int8
        assert isinstance(model.embedding, quant.QWeight) == (sch.table is not None)
        assert quant.mode_of(model) == mode
        np.testing.assert_allclose(np.asarray(forward(model, ids())), want_full, atol=1e-5,
                                   rtol=0)
        np.testing.assert_allclose(np.asarray(decode_logits(model, ids())), want_step,
                                   atol=1e-5, rtol=0)
        # one row: batch-1 decode's logits take the fused matrix-vector product on the CPU
        np.testing.assert_allclose(np.asarray(decode_logits(model, ids()[:1])),
                                   want_step[:1], atol=1e-5, rtol=0)
    f32 = np.asarray(forward(float_model(tensors), ids()))
    got = np.asarray(forward(loaded, ids()))
    err = np.abs(got - f32).max() / np.abs(f32).max()
    assert 0 < err <= F32_TOLERANCE, err
    assert (got.argmax(-1) == f32.argmax(-1)).mean() >= 0.9


def test_dot_matches_numpy_for_every_projection_layout():
    rng = np.random.default_rng(3)
    cases = [("btd,dhk->bthk", (2, 3, 64), (64, 4, 16), (0,)),
             ("bthk,hkd->btd", (2, 3, 4, 16), (4, 16, 64), (0, 1)),
             ("bhk,hkd->bd", (2, 4, 16), (4, 16, 64), (0, 1)),
             ("...d,df->...f", (2, 3, 64), (64, 96), (0,))]
    for spec, xs, ws, in_axes in cases:
        x = rng.normal(size=xs).astype(np.float32)
        w = rng.normal(size=ws).astype(np.float32)
        for group in (0, 32):
            values, scale = quant.quantize_array(w, in_axes, group)
            qa = quant.QArray(values, scale, in_axes, group)
            # the reference: the weight as [in, out] rows, quantized by numpy_fake_quant
            n_in = int(np.prod([ws[a] for a in in_axes]))
            ref_w = numpy_fake_quant(w.reshape(n_in, -1).T, group).T.reshape(ws)
            want = np.einsum(spec, x.astype(np.float64), ref_w)
            for chunk in (1 << 19, 256):
                quant.CHUNK_BYTES, old = chunk, quant.CHUNK_BYTES
                try:
                    got = jax.jit(lambda x, qa, spec=spec: quant.dot(x, qa, spec))(x, qa)
                finally:
                    quant.CHUNK_BYTES = old
                np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=0)


def test_searched_scales_find_a_coarser_grid_and_clip_outliers():
    """Hand values: weights already on a 5-bit grid per block of 32 (a GGUF Q5_0 tensor)
    come back exactly with the searched scales (max|w| / 127 misses the grid); a row with one
    far outlier gets a clipped scale (k > 127) and a smaller error than max|w| / 127."""
    rng = np.random.default_rng(5)
    d = rng.uniform(0.001, 0.01, (64, 20, 1)).astype(np.float32)  # [out, blocks, 1]
    q5 = rng.integers(-16, 16, (64, 20, 32)).astype(np.float32)
    q5[:, :, 0] = -16  # every block reaches the grid's end: max|w| = 16 d
    w = (q5 * d).reshape(64, 640)  # [out, in]
    for search, exact in ((False, False), (True, True)):
        values, scale = quant.quantize_array(w.T, (0,), 32, xp=np, search=search)
        back = np.asarray(quant.QArray(values, scale, (0,), 32).dequantize()).T
        assert np.array_equal(back, w) == exact
    k = quant.search_scales(np.abs(w) * 0 + w)  # per row: whole rows are the blocks
    assert k.shape == (64,) and set(np.unique(k)) <= set(SEARCH_K)
    row = rng.normal(0, 1, (1, 4096)).astype(np.float32)
    row[0, 7] = 40.0  # one outlier, 10x the rest's largest
    (k,) = quant.search_scales(row)
    assert k > 127
    errs = {kk: np.sum((row - (s := 40 / np.float32(kk)) * np.clip(np.round(row / s), -127,
                                                                    127)) ** 2)
            for kk in (127, k)}
    assert errs[k] < errs[127]


def test_float_table_modes_save_and_load_gguf_q8_0(tmp_path, monkeypatch):
    """``-ftable``: the table stays float through Orbax and through a Q8_0 GGUF (its blocks
    dequantized, the projections loaded as stored)."""
    monkeypatch.setenv("MEDGEMMA_CONVERT_CACHE", "0")
    tensors = hf_tensors(CFG, seed=8)
    model = int8_model(tensors, "int8-g32-mse-ftable")
    save_decoder(model, tmp_path / "q")
    back = load_decoder(tmp_path / "q")
    assert quant.mode_of(back) == "int8-g32-mse-ftable"
    assert not isinstance(back.embedding, quant.QWeight)
    np.testing.assert_array_equal(np.asarray(forward(back, ids())), np.asarray(forward(model, ids())))
    path = tmp_path / "tiny-q8_0.gguf"
    write_q8_gguf(path, CFG, tensors)
    q8 = load_decoder(path, quantize="int8-ftable")  # Q8_0: groups of 32, table float
    assert quant.mode_of(q8) == "int8-g32-ftable"
    ref = load_decoder(path)  # gguf's own dequantization
    np.testing.assert_array_equal(np.asarray(q8.embedding[...]), np.asarray(ref.embedding[...]))
    np.testing.assert_allclose(np.asarray(forward(q8, ids())), np.asarray(forward(ref, ids())),
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no mode name"):
        save_decoder(quant.quantize(float_model(tensors), quant.Scheme(None, 0)), tmp_path / "x")


def _buffers(hlo: str) -> str:
    """The compiled program's text without the bodies of its fusions: what remains are the
    instructions whose results are buffers (a value inside a fusion is never stored whole)."""
    fused = set(re.findall(r"fusion\(.*?calls=(%[\w.\-]+)", hlo))
    keep, skipping = [], False
    for line in hlo.splitlines():
        if line and not line.startswith(" "):  # a computation starts (or ENTRY, or "}")
            skipping = line.split(" ")[0] in fused
        if not skipping:
            keep.append(line)
    return "\n".join(keep)


def _f32_copies(hlo: str, shapes) -> list[str]:
    """Float32 buffers in a compiled program with a weight's shape or element count."""
    sizes = {int(np.prod(s)) for s in shapes}
    found = []
    for dims in set(re.findall(r"f32\[([0-9,]+)\]", _buffers(hlo))):
        shape = tuple(int(d) for d in dims.split(","))
        if int(np.prod(shape)) in sizes or shape in shapes:
            found.append(dims)
    return found


@pytest.mark.parametrize("chunk", [quant.CHUNK_BYTES, 32 << 10])
def test_compiled_decode_step_holds_no_float32_copy_of_a_weight(chunk, monkeypatch):
    """On the CPU a weight of at most CHUNK_BYTES (as float32) is converted whole, in cache;
    bigger ones never: with 32 KB chunks no weight here is, at the default only the table
    and the MLP (the biggest) are chunked."""
    monkeypatch.setattr(quant, "CHUNK_BYTES", chunk)
    cfg = Gemma3Config.tiny(vocab_size=8192, hidden_size=256, intermediate_size=1024,
                            num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64)
    model = quant.quantize(Gemma3(cfg, rngs=nnx.Rngs(0)), "int8")
    shapes = {tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
              if path[-1] == "values"}
    assert (8192, 256) in shapes and (256, 1024) in shapes
    from medgemma_core import Engine, Sampling

    engine = Engine(model, stop_ids=())  # the compiled decode loop itself
    st = engine.start([[2, 5, 7]], max_new_tokens=8, sampling=Sampling(), ignore_eos=True)
    compiled = Engine._decode.lower(
        engine, engine.state, st.carry, jnp.int32(8), st.key, st.temperature, st.top_p,
        skey=st.sampling.static_key(), stops=st.stops).compile()
    hlo = compiled.as_text()
    if jax.default_backend() == "cpu":  # elsewhere XLA fuses the conversion into the dot
        big = {s for s in shapes if np.prod(s) * 4 > chunk}
        assert (8192, 256) in big and (256, 1024) in big
        assert _f32_copies(hlo, big) == []
        table_f32 = 8192 * 256 * 4
        assert compiled.memory_analysis().temp_size_in_bytes < table_f32 / 4
    # the check finds the copy a plain conversion makes (for two rows XLA converts the whole
    # weight first; for one row it fuses the conversion into the product, as quant.logits does)
    naive = jax.jit(lambda x, w: x @ w.astype(jnp.float32).T).lower(
        jnp.zeros((2, 256)), jnp.zeros((8192, 256), jnp.int8)).compile().as_text()
    assert _f32_copies(naive, {(8192, 256)})


# ---- GGUF Q8_0 -------------------------------------------------------------------------------
def write_q8_gguf(path, cfg: Gemma3Config, tensors: dict[str, np.ndarray]) -> None:
    """A gemma3 GGUF file as llama.cpp writes it, every 2-D weight in Q8_0 (gguf's quantizer)."""
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_global_theta)
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(cfg.rope_global_scaling)
    w.add_sliding_window(cfg.sliding_window)
    for name, arr in tensors.items():
        if name == "embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "norm.weight":
            gname = "output_norm.weight"
        else:
            _, i, rest = name.split(".", 2)
            gname = f"blk.{i}.{_LLAMA_CPP[rest.removesuffix('.weight')]}.weight"
        if name.endswith("norm.weight"):
            w.add_tensor(gname, np.ascontiguousarray(arr + 1.0))  # llama.cpp stores 1 + w
        else:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_q8_0_gguf_loads_its_blocks_as_stored(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGEMMA_CONVERT_CACHE", "0")
    path = tmp_path / "tiny-q8_0.gguf"
    write_q8_gguf(path, CFG, hf_tensors(CFG, seed=4))
    model = load_decoder(path, quantize="int8")  # Q8_0: its own groups of 32, whatever mode
    assert quant.mode_of(model) == "int8-g32"
    # the int8 values are the file's bytes, as gguf's own reader sees them
    reader = gguf.GGUFReader(str(path))
    blocks = {t.name: np.asarray(t.data) for t in reader.tensors}
    emb = blocks["token_embd.weight"].reshape(CFG.vocab_size, -1, 34)
    np.testing.assert_array_equal(np.asarray(model.embedding.values[...]),
                                  emb[:, :, 2:].copy().view(np.int8).reshape(CFG.vocab_size, -1))
    gate = blocks["blk.2.ffn_gate.weight"].reshape(CFG.intermediate_size, -1, 34)
    np.testing.assert_array_equal(
        np.asarray(model.layers[2].mlp.gate.values[...]),
        gate[:, :, 2:].copy().view(np.int8).reshape(CFG.intermediate_size, -1).T)
    # logits equal those of the float model gguf dequantizes from the same file
    ref = load_decoder(path)
    np.testing.assert_allclose(np.asarray(forward(model, ids())), np.asarray(forward(ref, ids())),
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(decode_logits(model, ids())),
                               np.asarray(decode_logits(ref, ids())), atol=1e-5, rtol=0)


_PEAK = """
import json, os, sys
os.environ["MEDGEMMA_CONVERT_CACHE"] = "0"
from medgemma_core.checkpoints import load_decoder
def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import jax.numpy as jnp
jnp.zeros(1).block_until_ready()
before = rss("VmRSS:")
model = load_decoder(sys.argv[1], quantize=sys.argv[2] if len(sys.argv) > 2 else None)
print(json.dumps({"before": before, "peak": rss("VmHWM:")}))
"""


def _peak(*argv) -> int:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(_PEAK), *argv], check=True,
                         capture_output=True, text=True, timeout=600).stdout
    got = json.loads(out.strip().splitlines()[-1])
    return got["peak"] - got["before"]


@pytest.mark.slow  # two fresh processes loading a 70 MB file
def test_q8_0_load_never_holds_a_float32_copy(tmp_path):
    """Peak RSS of a load in a fresh process: a Q8_0 file with a 64 MB (int8) embedding."""
    cfg = Gemma3Config.tiny(vocab_size=131072, hidden_size=512, intermediate_size=64,
                            num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32)
    tensors = _small_tensors(cfg)
    path = tmp_path / "big-embedding.gguf"
    write_q8_gguf(path, cfg, tensors)
    del tensors
    table_f32 = 131072 * 512 * 4  # 256 MB
    native = _peak(str(path), "int8")
    dequantized = _peak(str(path))
    # native: the file's pages (68 MB), the int8 table in numpy and in JAX (64 MB each);
    # a float32 copy of the table alone would be 256 MB (the dequantizing load holds several)
    assert native < table_f32, (native, dequantized)
    assert dequantized > 2 * table_f32, (native, dequantized)


def _small_tensors(cfg):
    rng = np.random.default_rng(0)
    return {spec.name: (rng.normal(0, 0.05, spec.shape).astype(np.float32)
                        if not spec.name.endswith("norm.weight")
                        else np.zeros(spec.shape, np.float32))
            for spec in text_specs(cfg)}


# ---- Orbax, the command ----------------------------------------------------------------------
def test_quantized_orbax_folder_loads_quantized(tmp_path):
    tensors = hf_tensors(CFG, seed=6)
    model = int8_model(tensors, "int8")
    save_decoder(model, tmp_path / "q")
    back = load_decoder(tmp_path / "q")
    assert quant.mode_of(back) == "int8"
    saved = dict(nnx.to_flat_state(nnx.state(back, nnx.Param)))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(var.get_value()),
                                      np.asarray(saved[path].get_value()))
    np.testing.assert_array_equal(np.asarray(forward(back, ids())), np.asarray(forward(model, ids())))
    save_decoder(float_model(tensors), tmp_path / "f")
    size = {k: sum(f.stat().st_size for f in (tmp_path / k).rglob("*") if f.is_file())
            for k in "qf"}
    assert size["q"] < 0.5 * size["f"], size  # int8 + scales (+ Orbax metadata) vs float32


def test_every_command_takes_quantize():
    from medgemma_core.cli import QUANTIZE_MODES, _parser

    assert QUANTIZE_MODES == list(quant.MODES)

    for command in (["generate", "--prompt", "x"], ["chat"], ["convert", "a", "--to", "orbax",
                                                                "b"]):
        assert _parser().parse_args([*command, "--quantize", "int8"]).quantize == "int8"
        assert _parser().parse_args(command).quantize is None


@pytest.mark.slow  # a model with Gemma 3's whole vocabulary: about a minute
def test_command_generates_and_converts_with_quantize(tmp_path, capsys):
    from medgemma_core.cli import main
    from medgemma_core.testing import save_tokenizer_files

    folder = tmp_path / "tiny"
    save_decoder(float_model(hf_tensors(Gemma3Config.tiny(vocab_size=262145), seed=7),
                             Gemma3Config.tiny(vocab_size=262145)), folder)
    save_tokenizer_files(folder)
    assert main(["convert", str(folder), "--to", "orbax", str(tmp_path / "q"), "--quantize",
                 "int8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dtype"] == "int8"
    assert quant.mode_of(load_decoder(tmp_path / "q")) == "int8"
    for source in (folder, tmp_path / "q"):
        assert main(["generate", "--checkpoint", str(source), "--prompt", "The heart",
                     "--max-new-tokens", "4", "--quantize", "int8", "--json"]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert len(out["token_ids"]) <= 4
    with pytest.raises(SystemExit):
        main(["generate", "--checkpoint", str(folder), "--prompt", "x", "--quantize", "int4"])
    assert main(["convert", str(folder), "--to", "hf", str(tmp_path / "h"),
                 "--quantize", "int8"]) == 2
    assert "--to orbax" in capsys.readouterr().err


def test_unknown_mode_is_one_clear_error():
    from medgemma_core import load

    with pytest.raises(ValueError, match="unknown quantize mode 'int4'.*int8"):
        load("no-such-checkpoint", quantize="int4")  # before anything is read
    odd = Gemma3(Gemma3Config.tiny(hidden_size=48, num_layers=1, vocab_size=64),
                 rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="group size 32.*mode 'int8'"):
        quant.quantize(odd, "int8-g32")
