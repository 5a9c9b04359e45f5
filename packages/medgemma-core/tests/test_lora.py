"""LoRA on the decoder, the vision tower and the projector: adapters, what trains, merging,
and the PEFT export, which peft (the reference) applies to the transformers model."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from medgemma_core import Gemma3, Gemma3Config, Gemma3Multimodal, KVCache, MultimodalConfig
from medgemma_core.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRAConfig,
    adapters,
    apply_lora,
    base_filter,
    merge_lora,
    save_peft_adapter,
    trainable_filter,
    unmerge_lora,
)

IMG = 262_144


def _mm_tokens(cfg: MultimodalConfig, counts=(0, 1, 2)) -> np.ndarray:
    """Rows of 20 + 6 * 2 tokens holding ``counts`` images (boi, M image tokens, eoi)."""
    rng = np.random.default_rng(1)
    m = cfg.mm_tokens_per_image
    rows = []
    for count in counts:
        row = list(rng.integers(3, 5000, size=20))
        for k in range(count):
            row[3 + k * (m + 4):3 + k * (m + 4)] = [cfg.boi_token_id] + [IMG] * m + [
                cfg.eoi_token_id]
        rows.append((row + [0] * 40)[:20 + 2 * (m + 2)])
    return np.array(rows, np.int32)


def _pixels(cfg: MultimodalConfig, n: int, seed: int = 0) -> np.ndarray:
    size = cfg.vision.image_size
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def _randomize(model: nnx.Module, seed: int = 0, std: float = 0.3) -> None:
    """Non-zero b (and fresh a) in every adapter, so that each one changes the output."""
    key = jax.random.key(seed)
    for _, _, _, adapter in adapters(model):
        key, ka, kb = jax.random.split(key, 3)
        adapter.a.set_value(jax.random.normal(ka, adapter.a.shape) * std)
        adapter.b.set_value(jax.random.normal(kb, adapter.b.shape) * std)


def _flat(model: nnx.Module, filt=nnx.Param) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.array(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, filt))}


@pytest.fixture
def mm():
    cfg = MultimodalConfig.tiny()
    tokens = _mm_tokens(cfg)
    return Gemma3Multimodal(cfg, rngs=nnx.Rngs(0)), tokens, _pixels(cfg, 3)


def test_adapters_keep_the_base_paths_and_start_as_a_no_op(mm):
    model, tokens, pixels = mm
    before = _flat(model)
    logits = np.asarray(model(tokens, pixels))
    done = apply_lora(model, LoRAConfig(rank=4, alpha=8), rngs=nnx.Rngs(1))
    cfg = model.config
    assert len(done) == cfg.text.num_layers * 7 + cfg.vision.num_layers * 6 + 1
    assert "projector/weight" in done and "decoder/layers/0/attn/o" in done
    assert "vision/encoder/layers/1/self_attn/out_proj/kernel" in done
    after = _flat(model)
    assert set(before) <= set(after)
    new = set(after) - set(before)
    assert all("/lora/" in p and p.endswith(("/a", "/b")) for p in new), sorted(new)[:3]
    assert len(new) == 2 * len(done)
    assert all(np.array_equal(before[p], after[p]) for p in before)
    o = model.decoder.layers[0].attn.lora["o"]
    h, hd, d = cfg.text.num_heads, cfg.text.head_dim, cfg.text.hidden_size
    assert (o.a.shape, o.b.shape) == ((h, hd, 4), (4, d))
    assert o.a.get_metadata()["out_sharding"] == ("q_heads", "head_dim", "lora_rank")
    assert np.array_equal(np.asarray(model(tokens, pixels)), logits)  # b = 0


@pytest.mark.slow  # an eager grad of the image-text model (CI time); medgemma-train's
# test_stage_rl checks a LoRA policy's base stays bitwise unchanged in the default run
def test_base_parameters_bitwise_unchanged_after_an_adamw_step(mm):
    model, tokens, pixels = mm
    apply_lora(model, LoRAConfig(rank=4, dropout=0.1), rngs=nnx.Rngs(1))
    wrt = trainable_filter(model, decoder="lora", vision="lora", projector="lora")
    base = _flat(model, base_filter)
    lora_before = _flat(model, nnx.LoRAParam)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.1), wrt=wrt)
    labels = jnp.asarray(np.where(tokens == IMG, 0, tokens))

    def loss(model):
        logits = model(tokens, pixels)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]),
                                             labels[:, 1:, None], axis=-1))

    model.train()  # dropout on
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(model)
    assert set(_flat_grads(grads)) == set(lora_before)  # gradients of the adapters only
    optimizer.update(model, grads)
    model.eval()
    for path, value in _flat(model, base_filter).items():
        assert value.tobytes() == base[path].tobytes(), path
    moved = [p for p, v in _flat(model, nnx.LoRAParam).items()
             if not np.array_equal(v, lora_before[p])]
    assert len(moved) == len(lora_before)  # every a and b took a step


def _flat_grads(grads) -> list[str]:
    return ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(grads)]


def test_trainable_filter_per_part(mm):
    model, _, _ = mm
    with pytest.raises(ValueError, match="has no LoRA adapters: run apply_lora"):
        trainable_filter(model, decoder="lora")
    full_vision = trainable_filter(model, decoder="frozen", vision="full")
    paths = list(_flat(model, full_vision))
    assert paths and all(p.startswith("vision/") for p in paths)
    assert len(paths) == len(_flat(model.vision))
    apply_lora(model, LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    dec = _flat(model, trainable_filter(model, decoder="lora"))
    assert dec and all(p.startswith("decoder/") and "/lora/" in p for p in dec)
    both = _flat(model, trainable_filter(model, decoder="lora", vision="full", projector="lora"))
    assert any(p == "vision/embeddings/kernel" for p in both)
    assert "projector/lora/weight/a" in both and "projector/weight" not in both
    with pytest.raises(ValueError, match="choose one of lora, full, frozen"):
        trainable_filter(model, decoder="half")
    text = Gemma3(Gemma3Config.tiny(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="has no vision"):
        trainable_filter(text, decoder="full", vision="full")
    assert len(_flat(text, trainable_filter(text, decoder="full"))) == len(_flat(text))


def test_apply_lora_errors():
    model = Gemma3(Gemma3Config.tiny(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="match no projection"):
        apply_lora(model, LoRAConfig(targets="nothing_here"), rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(targets=r"attn/q$"), rngs=nnx.Rngs(0))
    assert len(adapters(model)) == model.config.num_layers
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, LoRAConfig(targets=r"layers/0/attn/q$"), rngs=nnx.Rngs(0))
    for bad in (dict(rank=0), dict(alpha=0), dict(dropout=1.0), dict(targets="(")):
        with pytest.raises(ValueError, match="LoRA"):
            LoRAConfig(**bad)


def test_merged_forward_equals_unmerged(mm):
    model, tokens, pixels = mm
    base_logits = np.asarray(model(tokens, pixels))
    apply_lora(model, LoRAConfig(rank=4, alpha=8), rngs=nnx.Rngs(1))
    _randomize(model, std=0.1)
    kernels = _flat(model, base_filter)
    unmerged = np.asarray(model(tokens, pixels))
    assert np.max(np.abs(unmerged - base_logits)) > 1e-2  # the adapters do something
    merge_lora(model)
    merged = np.asarray(model(tokens, pixels))
    diff = float(np.max(np.abs(merged - unmerged)))
    print(f"\nmerged vs unmerged logits: max |diff| {diff:.2e} (max |logit| "
          f"{np.max(np.abs(unmerged)):.2f})")
    assert diff <= 1e-5
    assert any(not np.array_equal(v, kernels[p]) for p, v in _flat(model, base_filter).items())
    unmerge_lora(model)
    assert float(np.max(np.abs(np.asarray(model(tokens, pixels)) - unmerged))) <= 1e-5
    for path, value in _flat(model, base_filter).items():
        np.testing.assert_allclose(value, kernels[path], atol=1e-6, err_msg=path)


def test_cached_decoding_with_adapters_equals_merged():
    """The decode step has its own o projection: adapters apply there too."""
    cfg = Gemma3Config.tiny()
    model = Gemma3(cfg, rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    _randomize(model, std=0.2)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)))

    def decode(model):
        cache = KVCache.create(cfg, 2, 16, jnp.zeros((2,), jnp.int32))
        _, cache = model(tokens[:, :8], cache=cache, logits_at="last")
        logits, _ = model(tokens[:, 8:], cache=cache, logits_at="last")
        return np.asarray(logits)

    unmerged = decode(model)
    merge_lora(model)
    assert float(np.max(np.abs(decode(model) - unmerged))) <= 1e-5


def test_dropout_only_in_training(mm):
    model, tokens, pixels = mm
    apply_lora(model, LoRAConfig(rank=4, dropout=0.5), rngs=nnx.Rngs(1))
    _randomize(model)
    evaluated = np.asarray(model(tokens, pixels))
    assert np.array_equal(np.asarray(model(tokens, pixels)), evaluated)
    model.train()
    a, b = np.asarray(model(tokens, pixels)), np.asarray(model(tokens, pixels))
    assert not np.array_equal(a, b) and not np.array_equal(a, evaluated)
    model.eval()
    assert np.array_equal(np.asarray(model(tokens, pixels)), evaluated)


# ---- PEFT export -------------------------------------------------------------------------------
def _peft_lora_modules(peft_model) -> set[str]:
    return {name.removeprefix("base_model.model.") for name, module in
            peft_model.named_modules() if hasattr(module, "lora_A") and len(module.lora_A)}


def test_peft_export_of_the_text_model(tmp_path):
    import torch
    from peft import PeftModel

    from medgemma_core import load_decoder
    from medgemma_core.testing import save_tiny_causal_lm

    ref = save_tiny_causal_lm(tmp_path / "hf", Gemma3Config.tiny(vocab_size=512))
    ours = load_decoder(tmp_path / "hf")
    apply_lora(ours, LoRAConfig(rank=4, alpha=8, dropout=0.05), rngs=nnx.Rngs(1))
    _randomize(ours, std=0.1)
    folder = save_peft_adapter(ours, tmp_path / "adapter", base_model_name_or_path="tiny")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.05)
    assert (folder / ADAPTER_WEIGHTS).is_file()

    tokens = np.random.default_rng(0).integers(0, 512, (2, 24))
    with torch.no_grad():
        base = ref(torch.tensor(tokens)).logits.numpy()
        peft_model = PeftModel.from_pretrained(ref, str(folder)).eval()
        want = peft_model(torch.tensor(tokens)).logits.numpy()
    assert _peft_lora_modules(peft_model) == {
        f"model.layers.{i}.{m}" for i in range(ours.config.num_layers)
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    got = np.asarray(ours(jnp.asarray(tokens))[0])
    assert np.max(np.abs(want - base)) > 1e-2  # the adapter changes the logits
    diff = float(np.max(np.abs(got - want)))
    print(f"\ntext PEFT: max |ours - peft| {diff:.2e}")
    assert diff <= 1e-4


def test_peft_export_of_the_image_text_model(tmp_path):
    import torch
    from peft import PeftModel

    from medgemma_core.checkpoints.multimodal import load_multimodal
    from medgemma_core.testing import save_tiny_mm

    ref = save_tiny_mm(tmp_path / "hf")
    ours = load_multimodal(tmp_path / "hf")
    apply_lora(ours, LoRAConfig(rank=4, alpha=4, dropout=0.0), rngs=nnx.Rngs(1))
    _randomize(ours, std=0.1)
    folder = save_peft_adapter(ours, tmp_path / "adapter")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert config["modules_to_save"] == ["multi_modal_projector"]  # merged projector

    cfg = ours.config
    tokens = _mm_tokens(cfg, (1, 2))
    pixels = _pixels(cfg, 3)
    hf_in = dict(input_ids=torch.tensor(tokens, dtype=torch.long),
                 pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
                 attention_mask=torch.tensor(tokens != 0, dtype=torch.long),
                 token_type_ids=torch.tensor((tokens == IMG).astype(np.int64)))
    with torch.no_grad():
        base = ref(**hf_in).logits.numpy()
        peft_model = PeftModel.from_pretrained(ref, str(folder)).eval()
        want = peft_model(**hf_in).logits.numpy()
    modules = _peft_lora_modules(peft_model)
    assert len(modules) == cfg.text.num_layers * 7 + cfg.vision.num_layers * 6
    assert "model.vision_tower.encoder.layers.1.mlp.fc2" in modules
    got = np.asarray(ours(tokens, pixels))
    assert np.max(np.abs(want - base)) > 1e-2
    valid = tokens != 0  # transformers masks the right padding differently; compare real tokens
    diff = float(np.max(np.abs(got - want)[valid]))
    print(f"\nimage-text PEFT: max |ours - peft| {diff:.2e}")
    assert diff <= 1e-4
    with pytest.raises(ValueError, match="save_projector=True"):
        save_peft_adapter(ours, tmp_path / "again", save_projector=False)
