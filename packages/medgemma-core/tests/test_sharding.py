"""Logical axis names, the rules table, meshes, memory reports and the 8-device check.

The per-device memory of 27B is checked against a hand calculation from the published config
numbers (REFERENCE.md section 2), written out below, not computed by the code under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from medgemma_core import Gemma3, Gemma3Config, Gemma3Multimodal, MultimodalConfig
from medgemma_core.sharding import (
    LOGICAL_RULES,
    builder,
    logical_to_mesh,
    memory_report,
    param_names,
    parse_mesh_shape,
)
from medsiglip.weights import abstract_module

RULES = dict(LOGICAL_RULES)


def _named(model: nnx.Module) -> dict[str, tuple]:
    return {"/".join(map(str, path)): param_names(v)
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("build", [
    lambda rngs: Gemma3(Gemma3Config.gemma3_4b(), rngs=rngs),
    lambda rngs: Gemma3Multimodal(MultimodalConfig.medgemma_4b(), rngs=rngs),
], ids=["gemma3-4b", "medgemma-4b"])
def test_every_parameter_has_one_known_name_per_axis(build):
    model = abstract_module(build)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert len(flat) > 300
    for path, variable in flat:
        names = param_names(variable)
        where = "/".join(map(str, path))
        assert names is not None, f"{where} has no logical axis names"
        assert len(names) == len(variable.shape), (where, names, variable.shape)
        assert all(n is None or n in RULES for n in names), (where, names)


def test_decoder_and_projector_names():
    named = _named(abstract_module(
        lambda rngs: Gemma3Multimodal(MultimodalConfig.tiny(), rngs=rngs)))
    assert named["decoder/embedding"] == ("vocab", "embed")
    assert named["decoder/layers/0/attn/q"] == ("embed", "q_heads", "head_dim")
    assert named["decoder/layers/0/attn/k"] == ("embed", "kv_heads", "head_dim")
    assert named["decoder/layers/0/attn/o"] == ("q_heads", "head_dim", "embed")
    assert named["decoder/layers/0/attn/q_norm/scale"] == ("head_dim",)
    assert named["decoder/layers/0/mlp/down"] == ("mlp", "embed")
    assert named["decoder/layers/0/pre_attn_norm/scale"] == ("embed",)
    assert named["projector/weight"] == ("vision_embed", "embed")
    assert named["vision/encoder/layers/0/self_attn/q_proj/kernel"] == ("vision_embed",
                                                                        "vision_heads")
    assert named["vision/encoder/layers/0/self_attn/out_proj/kernel"] == ("vision_heads",
                                                                          "vision_embed")
    assert named["vision/embeddings/kernel"][-1] == "vision_embed"


def test_logical_to_mesh_by_hand():
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    cfg = Gemma3Config.gemma3_270m()  # 1 kv head: not divisible by tensor=2 -> replicated
    assert cfg.num_kv_heads == 1
    d, k, hd = cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim
    assert logical_to_mesh(("embed", "kv_heads", "head_dim"), mesh, (d, k, hd)) == P("fsdp")
    assert logical_to_mesh(("embed", "q_heads", "head_dim"), mesh, (d, 4, hd)) == P(
        "fsdp", "tensor")
    assert logical_to_mesh(("vocab", "embed"), mesh, (262_144, d)) == P("tensor", "fsdp")
    # a batch of 2 keeps the prefix ("data",) of ("data", "fsdp"); a batch of 1 is replicated
    assert logical_to_mesh(("batch", "length"), mesh, (8, 5)) == P(("data", "fsdp"))
    assert logical_to_mesh(("batch", "length"), mesh, (2, 5)) == P("data")
    assert logical_to_mesh(("batch", "length"), mesh, (1, 5)) == P()
    # an axis is used once per array; size-1 mesh axes are dropped
    assert logical_to_mesh(("embed", "vision_embed"), mesh, (4, 4)) == P("fsdp")
    assert logical_to_mesh(("vocab", "embed"), {"data": 8, "fsdp": 1, "tensor": 1}) == P()
    with pytest.raises(KeyError, match="LOGICAL_RULES"):
        logical_to_mesh(("heads",), mesh, (8,))


def test_mesh_shapes_and_their_errors():
    assert parse_mesh_shape("data=2,fsdp=2,tensor=2", 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert parse_mesh_shape("data=2, fsdp=-1", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert parse_mesh_shape("tensor=-1", 4) == {"data": 1, "fsdp": 1, "tensor": 4}
    assert parse_mesh_shape("fsdp=8") == {"data": 1, "fsdp": 8, "tensor": 1}  # a plan
    for spec, match in [("data=3", "holds 3 devices but there are 8"),
                        ("pipeline=2,fsdp=4", "unknown axis 'pipeline'"),
                        ("data=-1,fsdp=-1", "only one axis may be -1"),
                        ("data=3,fsdp=-1", "8 devices do not divide by 3"),
                        ("data", "is not axis=size"), ("data=two", "is not axis=size"),
                        ("data=0,fsdp=-1", "sizes are positive"),
                        ("data=2,data=4", "names 'data' twice")]:
        with pytest.raises(ValueError, match=match):
            parse_mesh_shape(spec, 8)


def test_no_sharding_constraint_without_a_mesh():
    """Inference without a mesh traces exactly as before: no sharding ops at all; with a mesh
    set, the named activations are constrained."""
    model = Gemma3Multimodal(MultimodalConfig.tiny(), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((1, 6), jnp.int32)

    def forward(state):
        m = nnx.merge(graphdef, state)
        soft = m.encode_images(jnp.zeros((1, 32, 32, 3)))
        return m.decoder(tokens, embeddings=m.embed(tokens, None))[0], soft

    assert "sharding_constraint" not in str(jax.make_jaxpr(forward)(state))
    with jax.set_mesh(jax.make_mesh((1,), ("fsdp",),
                                    axis_types=(jax.sharding.AxisType.Auto,))):
        assert "sharding_constraint" in str(jax.make_jaxpr(forward)(state))


def _gemma3_27b_hand() -> tuple[int, int]:
    """(parameters, parameters per device on fsdp=8) of Gemma 3 27B from its config numbers:
    vocab 262208, D 5376, 62 layers, 32 heads, 16 kv heads, head_dim 128, MLP 21504."""
    v, d, layers, h, kv, hd, f = 262_208, 5376, 62, 32, 16, 128, 21_504
    per_layer_sharded = (d * h * hd          # q [D, H, Hd]: D over fsdp
                         + 2 * d * kv * hd   # k, v [D, K, Hd]
                         + h * hd * d        # o [H, Hd, D]
                         + 3 * d * f         # gate, up [D, F]; down [F, D]
                         + 4 * d)            # four RMSNorm scales [D]
    per_layer_replicated = 2 * hd            # q_norm, k_norm [Hd]: head_dim is replicated
    sharded = v * d + d + layers * per_layer_sharded  # + embedding [V, D], final norm [D]
    replicated = layers * per_layer_replicated
    assert sharded % 8 == 0
    return sharded + replicated, sharded // 8 + replicated


def test_27b_memory_on_fsdp8_matches_the_hand_calculation():
    total, per_device = _gemma3_27b_hand()
    assert total == 27_009_346_304
    report = memory_report(Gemma3Config.gemma3_27b(), "fsdp=8", optimizer="adamw")
    print(f"\nGemma 3 27B (text), f32:\n{report}")
    assert report.param_count == total
    assert report.param_bytes == 4 * total
    assert report.param_bytes_per_device == 4 * per_device == 13_504_728_704
    assert report.grad_bytes_per_device == 4 * per_device
    # AdamW: two f32 moments per parameter, sharded like it, plus one int32 step count
    assert report.optimizer_bytes_per_device == 2 * 4 * per_device + 4
    bf16 = memory_report(Gemma3Config.gemma3_27b(), "fsdp=8", dtype="bfloat16")
    assert bf16.param_bytes_per_device == 2 * per_device
    assert bf16.optimizer_bytes_per_device == 2 * 2 * per_device + 4  # optax keeps mu in bf16

    mm = memory_report(MultimodalConfig.medgemma_27b(), "fsdp=8")
    print(f"MedGemma 27B (image-text), f32:\n{mm}")
    dv, fv, layers, patch, grid = 1152, 4304, 27, 14, 64  # So400m/14 at 896, no head
    vision = (patch * patch * 3 * dv + dv + grid * grid * dv  # patch conv, positions
              + layers * (4 * (dv * dv + dv) + (dv * fv + fv) + (fv * dv + dv) + 4 * dv)
              + 2 * dv)  # post-LayerNorm
    assert mm.param_count == total + vision + dv + dv * 5376  # + projector norm and weight


def test_memory_report_of_lora_trains_only_the_adapters():
    from medsiglip.lora import LoRAConfig, apply_lora, trainable_filter

    model = abstract_module(builder(Gemma3Config.tiny()))
    apply_lora(model, LoRAConfig(rank=4), rngs=nnx.Rngs(0))
    report = memory_report(model, "data=1", trainable=trainable_filter(model))
    cfg = Gemma3Config.tiny()
    d, f, h, k, hd = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                      cfg.head_dim)
    per_layer = 4 * ((d + h * hd) + 2 * (d + k * hd) + (h * hd + d) + 2 * (d + f) + (f + d))
    assert report.trainable_count == cfg.num_layers * per_layer
    assert report.optimizer_bytes == 2 * 4 * report.trainable_count + 4


def test_eight_fake_devices_match_one_device():
    """data=2,fsdp=2,tensor=2 on 8 fake CPU devices: next_token_loss and every gradient within
    1e-5 of the single-device run (its own process: the device count is fixed when JAX
    starts)."""
    script = Path(__file__).with_name("eight_devices.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"\n{out}")
    assert out["devices"] == 8
    assert out["embedding_spec"] == "P('tensor', 'fsdp')"  # really sharded ...
    assert out["embedding_shard_shape"] == [262_208 // 2, 64 // 2]
    assert out["grad_embedding_spec"] == "P('tensor', 'fsdp')"
    assert out["collectives"] > 0  # ... and really communicating
    assert abs(out["loss_single"] - out["loss_mesh"]) <= 1e-5
    assert abs(out["loss_single"] - out["loss_plain"]) <= 1e-5  # the inference path's logits
    assert out["grad_worst"] <= 1e-5, out["grad_worst_path"]
    assert out["n_grads"] > 100
    assert np.isfinite(out["loss_single"])
