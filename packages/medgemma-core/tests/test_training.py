"""Training forward passes and the loss against transformers' ``loss.backward()`` (tiny random
checkpoints; the image-text one has the real 262,208-row vocabulary)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from medgemma_core import Gemma3Config, TrainingBatch, load_decoder, training
from medgemma_core.checkpoints.multimodal import _projector_specs, load_multimodal
from medgemma_core.checkpoints.names import text_specs
from medgemma_core.testing import IMAGE_SIZE, save_tiny_causal_lm, save_tiny_mm
from medgemma_core.training import (
    TrainBatch,
    forward_hidden,
    naive_next_token_loss,
    next_token_loss,
)
from medsiglip.checkpoints.convert import vision_specs

GRAD_TOL = 1e-4  # max |ours - transformers| / max |transformers|, per tensor
_ZERO_GRADIENT = "self_attn.k_proj.bias"


# ---- the tiny models ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_text")
    ref = save_tiny_causal_lm(folder, Gemma3Config.tiny())
    return load_decoder(folder), ref


@pytest.fixture(scope="module")
def mm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_mm")
    return folder, save_tiny_mm(folder)


@pytest.fixture(scope="module")
def mm_pair(mm_folder):
    return load_multimodal(mm_folder[0]), mm_folder[1]


def _image_text_batch(cfg, images_per_row=(0, 1, 2), seed=0, pad=3) -> TrainingBatch:
    """Right-padded rows of text and ``<start_of_image>`` + M image tokens + ``<end_of_image>``,
    labels -100 on padding, image and ``<start_of_image>`` tokens (as Processor.collate)."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in images_per_row:
        ids = list(rng.integers(10, 5000, 4))
        for _ in range(n):
            ids += [cfg.boi_token_id] + [cfg.image_token_id] * cfg.mm_tokens_per_image
            ids += [cfg.eoi_token_id] + list(rng.integers(10, 5000, 3))
        rows.append(ids)
    b, t = len(rows), max(map(len, rows)) + pad
    ids = np.zeros((b, t), np.int32)
    mask = np.zeros((b, t), np.int32)
    labels = np.full((b, t), -100, np.int32)
    for r, row in enumerate(rows):
        row = np.asarray(row, np.int32)
        ids[r, :len(row)], mask[r, :len(row)] = row, 1
        no_loss = (row == cfg.image_token_id) | (row == cfg.boi_token_id)
        labels[r, :len(row)] = np.where(no_loss, -100, row)
    s = cfg.vision.image_size
    pixels = rng.uniform(-1, 1, (sum(images_per_row), s, s, 3)).astype(np.float32)
    return TrainingBatch(ids, mask, labels, (ids == cfg.image_token_id).astype(np.int32), pixels,
                         list(images_per_row))


def _text_batch(vocab: int, seed=0) -> TrainBatch:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (3, 29)).astype(np.int32)  # longer than the window of 8
    mask = np.ones_like(tokens)
    mask[1, 20:] = 0  # right padding
    labels = np.where(rng.random(tokens.shape) < 0.2, -100, tokens).astype(np.int32)
    labels[mask == 0] = -100
    return TrainBatch(tokens, labels, mask)


# ---- transformers' side ---------------------------------------------------------------------
def _hf_loss_and_grads(ref, **inputs) -> tuple[float, dict[str, np.ndarray]]:
    ref.zero_grad()
    out = ref(**{k: torch.as_tensor(v) for k, v in inputs.items()})
    out.loss.backward()
    grads = {n: p.grad.double().numpy() for n, p in ref.named_parameters()}
    return float(out.loss.detach()), grads


def _mean_loss_and_grads(model, batch, **kw):
    """The mean loss and its gradient, jitted (eager autodiff compiles every primitive on its
    own: over a thousand small programs, most of these tests' time)."""
    graphdef, state = nnx.split(model)

    def mean(s):
        total, n = next_token_loss(nnx.merge(graphdef, s), batch, **kw)
        return total / n

    return jax.jit(jax.value_and_grad(mean))(state)


def _value(v) -> np.ndarray:
    return np.asarray(v.get_value() if hasattr(v, "get_value") else v)


def _compare(grads, hf_grads, specs) -> dict[str, float]:
    """Every parameter's gradient against transformers' (converted with its spec), and every
    parameter covered by exactly one spec."""
    ours = {tuple(p): _value(v) for p, v in nnx.to_flat_state(grads)}
    assert sorted(map(str, ours)) == sorted(str(s.path) for s in specs)
    assert {s.name for s in specs} == set(hf_grads)  # lm_head is the tied embedding
    errors = {}
    for s in specs:
        want = np.asarray(s.convert(hf_grads[s.name]))
        got = ours[tuple(s.path)]
        assert got.shape == want.shape, s.name
        scale = np.max(np.abs(want))
        if s.name.endswith(_ZERO_GRADIENT):
            # a key bias adds q.b to every score of a query: softmax ignores it, its gradient is
            # zero and both sides hold rounding noise; compare it with the query bias's scale
            q_bias = np.max(np.abs(hf_grads[s.name.replace("k_proj", "q_proj")]))
            assert max(np.max(np.abs(got)), scale) <= 1e-5 * q_bias, s.name
            continue
        assert scale > 0, f"{s.name}: transformers' gradient is zero; the test would be empty"
        errors[s.name] = float(np.max(np.abs(got - want)) / scale)
    bad = {k: v for k, v in errors.items() if v > GRAD_TOL}
    assert not bad, bad
    return errors


# ---- parity with transformers ---------------------------------------------------------------
def test_text_loss_and_grads_match_transformers(text_pair):
    model, ref = text_pair
    cfg = model.config
    batch = _text_batch(cfg.vocab_size)
    want_loss, want = _hf_loss_and_grads(ref.train(), input_ids=batch.tokens.astype(np.int64),
                                         attention_mask=batch.attention_mask.astype(np.int64),
                                         labels=batch.labels.astype(np.int64))
    loss, grads = _mean_loss_and_grads(model, batch, chunk=16)
    assert abs(float(loss) - want_loss) < 1e-5
    errors = _compare(grads, want, text_specs(cfg, "model."))
    print(f"text: loss {float(loss):.6f} (transformers {want_loss:.6f}), worst gradient "
          f"{max(errors.values()):.2e} ({max(errors, key=errors.get)})")


def test_scanned_layers_match_transformers(tmp_path):
    """13 layers: two scanned periods of 5 local + 1 global, then one unrolled layer; with full
    rematerialization inside the scan."""
    cfg = Gemma3Config.tiny(num_layers=13)
    ref = save_tiny_causal_lm(tmp_path, cfg, seed=1)
    model = load_decoder(tmp_path)
    batch = _text_batch(cfg.vocab_size, seed=2)
    want_loss, want = _hf_loss_and_grads(ref.train(), input_ids=batch.tokens.astype(np.int64),
                                         attention_mask=batch.attention_mask.astype(np.int64),
                                         labels=batch.labels.astype(np.int64))
    loss, grads = _mean_loss_and_grads(model, batch, chunk=16, scan=True, remat="full")
    assert abs(float(loss) - want_loss) < 1e-5
    _compare(grads, want, text_specs(cfg, "model."))
    graphdef, state = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(
        lambda s: next_token_loss(nnx.merge(graphdef, s), batch, scan=True)[0])(state))
    assert jaxpr.count("scan[") == 1  # the layers' scan
    assert jaxpr.count("while[") == 1  # the loss's full chunks (the rest: conds)


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scanned-vision"])
def test_image_text_loss_and_grads_match_transformers(mm_pair, scan):
    """Rows with 0, 1 and 2 images in 2 slots; window 8 < image block 16; the vision tower's
    and the projector's gradients included (with scan: the 2 vision blocks as a lax.scan)."""
    model, ref = mm_pair
    cfg = model.config
    collated = _image_text_batch(cfg)
    batch = TrainBatch.from_collated(collated, slots=2)
    assert batch.pixels.shape == (3, 2, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch.image_mask.tolist() == [[False, False], [True, False], [True, True]]
    want_loss, want = _hf_loss_and_grads(
        ref.train(), input_ids=collated.input_ids.astype(np.int64),
        attention_mask=collated.attention_mask.astype(np.int64),
        token_type_ids=collated.token_type_ids.astype(np.int64),
        pixel_values=collated.pixel_values.transpose(0, 3, 1, 2),
        labels=collated.labels.astype(np.int64))
    loss, grads = _mean_loss_and_grads(model, batch, chunk=32, scan=scan)
    assert abs(float(loss) - want_loss) < 1e-5
    specs = [_prefixed(s, "decoder") for s in text_specs(cfg.text, "model.language_model.")]
    specs += [_prefixed(s, "vision") for s in vision_specs(cfg.vision, "model.vision_tower.")]
    specs += [_prefixed(s, "projector")
              for s in _projector_specs(cfg, "model.multi_modal_projector.")]
    errors = _compare(grads, want, specs)
    print(f"image-text: loss {float(loss):.6f} (transformers {want_loss:.6f}), worst gradient "
          f"{max(errors.values()):.2e} ({max(errors, key=errors.get)})")


def _prefixed(spec, head):
    return dataclasses.replace(spec, path=(head,) + tuple(spec.path))


# ---- chunked loss ---------------------------------------------------------------------------
def _naive_head(hs, table, targets):
    """Summed cross entropy of ``hs [n, D]`` over ``table [V, D]``, written out plainly."""
    logp = jax.nn.log_softmax(hs @ table.T, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
    return -jnp.sum(jnp.where(targets >= 0, picked, 0.0))


@pytest.mark.parametrize("n_valid", [0, 5, 37, 64, 100])
def test_loss_head_equals_naive(n_valid):
    """The fused head (gradients computed in its forward pass, only the labelled rows
    projected: chunk 16 asked, 100 rows -> chunks of 15, then 7, 3, 1) against plain autodiff, for the hidden states and
    the table; labelled rows scattered among unlabelled ones; with the table frozen, its
    gradient is not computed at all."""
    rng = np.random.default_rng(n_valid)
    n, d, v = 100, 24, 300
    hs = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    table = jnp.asarray(rng.standard_normal((v, d)) * 0.3, jnp.float32)
    targets = np.full(n, -100, np.int32)
    targets[rng.permutation(n)[:n_valid]] = rng.integers(0, v, n_valid)
    targets = jnp.asarray(targets)
    fused = lambda h, w: training._token_losses(h, w, targets, 16, None)  # noqa: E731
    want, (wh, ww) = jax.value_and_grad(_naive_head, argnums=(0, 1))(hs, table, targets)
    got, (gh, gw) = jax.value_and_grad(fused, argnums=(0, 1))(hs, table)
    assert abs(float(got) - float(want)) <= 1e-6 * max(abs(float(want)), 1.0)
    for a, b in ((gh, wh), (gw, ww)):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-6 * max(float(jnp.max(jnp.abs(b))), 1e-30)
    if n_valid == 0:
        assert float(got) == 0.0 and not np.any(np.asarray(gh)) and not np.any(np.asarray(gw))
    frozen = str(jax.make_jaxpr(jax.grad(lambda h: fused(h, table)))(hs))
    full = str(jax.make_jaxpr(jax.grad(fused, argnums=(0, 1)))(hs, table))
    n_dots = lambda text: text.count("dot_general[")  # noqa: E731
    assert n_dots(frozen) * 3 == n_dots(full) * 2  # per chunk size: 2 products, not 3


def test_chunk_sizes_split_the_rows_evenly():
    """The asked chunk is shrunk to split the rows into equal chunks (a fully labelled batch
    then has no small tail chunks: 4 x 511 for 4 rows of 512 tokens), then halved 3 times."""
    assert training._sizes(512, 4 * 511) == [511, 255, 127, 63]
    assert training._sizes(512, 2 * 511) == [511, 255, 127, 63]
    assert training._sizes(512, 1024) == [512, 256, 128, 64]
    assert training._sizes(512, 300) == [300, 150, 75, 37]
    assert training._sizes(16, 100) == [15, 7, 3, 1]
    assert training._sizes(4, 3) == [3, 1]


def test_chunked_loss_equals_naive_and_needs_less_memory(mm_pair):
    model, _ = mm_pair
    batch = TrainBatch.from_collated(_image_text_batch(model.config, (1, 0), seed=3, pad=20),
                                     slots=1)
    n = batch.tokens.shape[0] * (batch.tokens.shape[1] - 1)
    assert 64 < n < 128  # more tokens than one chunk of 64

    def mean(loss_fn):
        return lambda m: (lambda s, n: s / n)(*loss_fn(m, batch))

    chunked = mean(lambda m, b: next_token_loss(m, b, chunk=64))
    naive = mean(naive_next_token_loss)
    graphdef, state = nnx.split(model)
    compiled, temp = {}, {}  # one compile per loss: its memory figure, and the values it gives
    for name, fn in (("naive", naive), ("chunk 64", chunked),
                     ("chunk 16", mean(lambda m, b: next_token_loss(m, b, chunk=16)))):
        def step(state, fn=fn):
            return jax.value_and_grad(lambda s: fn(nnx.merge(graphdef, s)))(state)

        compiled[name] = jax.jit(step).lower(state).compile()
        temp[name] = compiled[name].memory_analysis().temp_size_in_bytes

    lc, gc = compiled["chunk 64"](state)
    ln, gn = compiled["naive"](state)
    assert abs(float(lc) - float(ln)) <= 1e-6 * abs(float(ln))
    want = dict(nnx.to_flat_state(gn))
    for path, got in nnx.to_flat_state(gc):
        a, b = _value(got), _value(want[path])
        if path[-2:] == ("k_proj", "bias"):  # zero in exact arithmetic (see _compare)
            q_bias = _value(want[path[:-2] + ("q_proj", "bias")])
            assert max(np.max(np.abs(a)), np.max(np.abs(b))) <= 1e-5 * np.max(np.abs(q_bias))
            continue
        # the head's own gradients agree within 1e-6 (test_loss_head_equals_naive); through
        # the layers, f32 rounding of the other summation order grows (measured: 2.6e-6)
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b)), path

    b, t = batch.tokens.shape
    v = model.config.text.vocab_size
    logits_bytes = b * (t - 1) * v * 4
    print(f"value_and_grad temp_size_in_bytes, B={b} T={t} V={v} (f32 logits {logits_bytes} "
          f"bytes): " + ", ".join(f"{k} {n}" for k, n in temp.items()))
    assert temp["naive"] >= logits_bytes  # the naive program holds the whole logits
    assert temp["chunk 16"] < logits_bytes
    assert temp["chunk 16"] < temp["chunk 64"] < temp["naive"]


# ---- static shapes, the Python boundary ------------------------------------------------------
def test_one_compile_for_batches_with_different_image_counts(mm_pair):
    model, _ = mm_pair
    traces = []

    @jax.jit
    def step(state, batch):
        traces.append(1)
        return jax.grad(lambda s: next_token_loss(nnx.merge(graphdef, s), batch)[0])(state)

    graphdef, state = nnx.split(model)
    first = TrainBatch.from_collated(_image_text_batch(model.config, (0, 1, 2), pad=3), slots=2)
    second = TrainBatch.from_collated(_image_text_batch(model.config, (2, 2, 0), pad=3), slots=2)
    assert first.tokens.shape == second.tokens.shape
    assert first.image_mask.sum() != second.image_mask.sum()
    step(state, first)
    step(state, second)
    assert len(traces) == 1 and step._cache_size() == 1


def test_image_count_errors_at_the_boundary(mm_pair):
    cfg = mm_pair[0].config
    collated = _image_text_batch(cfg, (0, 1, 2))
    with pytest.raises(ValueError, match="row 2 holds 2 images but the batch has 1 image slots"):
        TrainBatch.from_collated(collated, slots=1)
    broken = TrainingBatch(collated.input_ids, collated.attention_mask, collated.labels,
                           collated.token_type_ids, collated.pixel_values, [0, 2, 1])
    with pytest.raises(ValueError, match="row 1 holds image-token runs of lengths"):
        TrainBatch.from_collated(broken, slots=2)
    short = TrainingBatch(collated.input_ids, collated.attention_mask, collated.labels,
                          collated.token_type_ids, collated.pixel_values[:2], [0, 1, 2])
    with pytest.raises(ValueError, match="2 images for images_per_row"):
        TrainBatch.from_collated(short, slots=2)
    with pytest.raises(ValueError, match="labels has shape"):
        TrainBatch(collated.input_ids, collated.labels[:, :-1], collated.attention_mask)


def test_text_model_rejects_images(text_pair, mm_pair):
    batch = TrainBatch.from_collated(_image_text_batch(mm_pair[0].config, (1,)), slots=1)
    with pytest.raises(ValueError, match="text-only Gemma3 model got a batch with images"):
        forward_hidden(text_pair[0], batch)


def test_soft_tokens_go_to_their_own_rows(mm_pair):
    """Slot k of row b fills row b's k-th image run: moving an image from row 0 to row 2
    (batch order changes, per-row content does not) leaves each row's hidden states alone."""
    model, _ = mm_pair
    collated = _image_text_batch(model.config, (1, 0, 2), seed=5)
    swapped = TrainingBatch(*(x[::-1] for x in (collated.input_ids, collated.attention_mask,
                                                 collated.labels, collated.token_type_ids)),
                            np.concatenate([collated.pixel_values[1:], collated.pixel_values[:1]]),
                            [2, 0, 1])
    a = forward_hidden(model, TrainBatch.from_collated(collated, slots=2))
    b = forward_hidden(model, TrainBatch.from_collated(swapped, slots=2))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b)[::-1], atol=1e-5, rtol=1e-5)


# ---- precision ------------------------------------------------------------------------------
def _dot_operand_dtypes(jaxpr) -> list[tuple[tuple[str, ...], tuple]]:
    """(operand dtypes, operand shapes) of every dot_general in a jaxpr and its sub-jaxprs."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append((tuple(str(v.aval.dtype) for v in eqn.invars),
                        tuple(tuple(v.aval.shape) for v in eqn.invars)))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if hasattr(sub, "consts") and hasattr(sub, "jaxpr"):  # ClosedJaxpr
                    out += _dot_operand_dtypes(sub.jaxpr)
                elif hasattr(sub, "eqns"):
                    out += _dot_operand_dtypes(sub)
    return out


def test_bf16_compute_on_f32_master_weights(mm_folder, mm_pair):
    """compute_dtype=bf16 on f32 parameters: every product runs in bf16 (forward and backward),
    the loss equals that of the model loaded in bf16, and the gradients are f32."""
    model, _ = mm_pair
    batch = TrainBatch.from_collated(_image_text_batch(model.config, (0, 1, 2)), slots=2)

    def mean(m, **kw):
        total, n = next_token_loss(m, batch, chunk=32, **kw)
        return total / n

    # eager on purpose: jitted, XLA keeps more of the bf16 intermediates in f32 and the bf16
    # rounding asserted below hardly shows
    l32, g32 = nnx.value_and_grad(mean)(model)
    lmix, gmix = nnx.value_and_grad(lambda m: mean(m, compute_dtype=jnp.bfloat16))(model)
    bf16 = load_multimodal(mm_folder[0], dtype="bfloat16")  # bf16 throughout, loaded as such
    lbf, gbf = nnx.value_and_grad(mean)(bf16)
    assert {x.dtype for x in jax.tree.leaves(gmix)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(gbf)} == {jnp.dtype(jnp.bfloat16)}
    rel = abs(float(lmix) - float(l32)) / float(l32)
    print(f"loss f32 {float(l32):.6f}, bf16 compute on f32 masters {float(lmix):.6f}, "
          f"bf16 model {float(lbf):.6f}")
    assert abs(float(lmix) - float(lbf)) <= 1e-6 * float(lbf)
    assert 1e-5 < rel < 1e-2  # bf16 rounding shows, and stays small
    cosine = {}  # bf16 products round to 8 bits: compare directions, tensor by tensor
    for (path, a), (_, b) in zip(nnx.to_flat_state(gmix), nnx.to_flat_state(g32), strict=True):
        a, b = _value(a).ravel(), _value(b).ravel()
        if path[-2:] != ("k_proj", "bias"):
            cosine[path] = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    worst = min(cosine, key=cosine.get)
    print(f"bf16-compute gradients vs f32: lowest cosine {cosine[worst]:.5f} ({worst})")
    assert cosine[worst] > 0.99

    graphdef, state = nnx.split(model)

    def dots(**kw):
        step = jax.grad(lambda s: mean(nnx.merge(graphdef, s), **kw))
        return _dot_operand_dtypes(jax.make_jaxpr(step)(state).jaxpr)

    bf, f32 = ("bfloat16", "bfloat16"), ("float32", "float32")
    mixed = dots(compute_dtype=jnp.bfloat16)
    # forward products bf16 x bf16; a backward product may take the float32 cotangent of a
    # float32-accumulated product (the decoder's layers.matmul), never two float32 operands
    assert f32 not in {d for d, _ in mixed} and bf in {d for d, _ in mixed}
    v = model.config.text.vocab_size
    head = [d for d, shapes in mixed if v in sum(shapes, ())]
    # the loss head: logits, input and table gradients, at each chunk size: bf16
    assert len(head) % 3 == 0 and set(head) == {bf}
    assert {d for d, _ in dots()} == {f32}


# ---- rematerialization ----------------------------------------------------------------------
def test_remat_policies_same_gradients_less_memory(mm_pair, text_pair):
    model, _ = mm_pair
    batch = TrainBatch.from_collated(_image_text_batch(model.config, (0, 1, 2)), slots=2)
    graphdef, state = nnx.split(model)

    def grads(remat):
        def step(s):
            return jax.grad(lambda s: next_token_loss(nnx.merge(graphdef, s), batch, chunk=32,
                                                      remat=remat)[0])(s)
        return step

    want = jax.tree.leaves(grads("none")(state))
    for remat in ("full", "dots"):
        jaxpr = jax.make_jaxpr(grads(remat))(state)
        n_layers = model.config.text.num_layers + model.config.vision.num_layers
        text = str(jaxpr)  # jax.checkpoint is the primitive remat2 in a grad's jaxpr
        assert text.count("remat2[") + text.count("checkpoint[") == n_layers  # one per block
        for a, b in zip(jax.tree.leaves(grads(remat)(state)), want, strict=True):
            scale = max(float(jnp.max(jnp.abs(b))), 1e-30)
            assert float(jnp.max(jnp.abs(a - b))) <= 1e-6 * scale

    text, _ = text_pair  # activations dominate: 7 layers, 2 x 256 tokens, vocabulary 512
    tokens = np.ones((2, 256), np.int32)
    long = TrainBatch(tokens, tokens, tokens)
    graphdef, state = nnx.split(text)
    temp = {}
    for remat in ("none", "full", "dots"):
        def step(s, remat=remat):
            return jax.grad(lambda s: next_token_loss(nnx.merge(graphdef, s), long,
                                                      remat=remat)[0])(s)
        temp[remat] = jax.jit(step).lower(state).compile().memory_analysis().temp_size_in_bytes
    print("grad temp_size_in_bytes by remat policy (tiny text, B=2, T=256): "
          + ", ".join(f"{k} {v}" for k, v in temp.items()))
    assert temp["full"] < temp["dots"] < temp["none"]


def test_remat_choices_are_checked(text_pair):
    from medgemma_core import KVCache

    model, _ = text_pair
    tokens = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="remat='some' is not a policy; choose one of 'none'"):
        model(tokens, remat="some")
    cache = KVCache.create(model.config, 1, 8, jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="remat and scan are for training"):
        model(tokens, cache=cache, remat="full")
    with pytest.raises(ValueError, match="remat and scan are for training"):
        model(tokens, cache=cache, scan=True)
