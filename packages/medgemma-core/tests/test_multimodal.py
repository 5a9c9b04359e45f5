"""The image-text model against transformers' Gemma3ForConditionalGeneration (tiny random
checkpoints with the real 262,208-row vocabulary, 112 px images, 16 soft tokens per image)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from medgemma_core import Sampling, load
from medgemma_core.checkpoints.multimodal import (
    is_multimodal,
    load_multimodal,
    read_multimodal_config,
    save_multimodal,
)
from medgemma_core.multimodal import MultimodalConfig, Projector, image_blocks
from medgemma_core.processor import Processor
from medgemma_core.testing import MM_TOKENS, random_images, reference_processor, save_tiny_mm
from medsiglip.weights import SafetensorsSource, abstract_module


@pytest.fixture(scope="module")
def tiny_mm(tmp_path_factory, hf_folder_reference):
    ref_tok, tok_folder = hf_folder_reference
    folder = tmp_path_factory.mktemp("tiny_mm")
    ref = save_tiny_mm(folder, tok_folder)
    return folder, ref, reference_processor(ref_tok)


@pytest.fixture(scope="module")
def ours(tiny_mm):
    return load_multimodal(tiny_mm[0])


@pytest.fixture(scope="module")
def processor(tiny_mm, hf_folder_tokenizer):
    return Processor.from_checkpoint(tiny_mm[0], hf_folder_tokenizer)


def _messages(images, text="Describe the findings in this image, please, in detail."):
    content = [{"type": "text", "text": text}] + [{"type": "image", "image": im} for im in images]
    return [{"role": "system", "content": "You are an expert radiologist."},
            {"role": "user", "content": content}]


def _ref_logits(ref, ids, pixels):
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids)[None],
                  pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
                  token_type_ids=torch.tensor((np.asarray(ids) == 262144).astype(np.int64))[None])
    return out.logits[0].float().numpy()


def test_config_read_from_checkpoint(tiny_mm):
    folder, ref, _ = tiny_mm
    cfg = read_multimodal_config(folder)
    assert is_multimodal(folder)
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.mm_tokens_per_image) == (112, 7, 16)
    assert cfg.pool == 4 and cfg.text.vocab_size == 262_208 == ref.config.text_config.vocab_size
    assert cfg.image_token_id == ref.config.image_token_id == 262144
    assert not cfg.vision.use_head


# one image is a sub-case of two (two image blocks, each its own bidirectional block): slow,
# for CI time
@pytest.mark.parametrize("n_images", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_logits_match_transformers(tiny_mm, ours, processor, n_images):
    _, ref, _ = tiny_mm
    images = random_images(n_images, [(90, 130), (140, 100)][:n_images])
    text = "Compare the two studies and list every change you see." if n_images == 2 else None
    p = processor(_messages(images, *([text] if text else [])))
    assert len(p.input_ids) > 3 * ours.config.text.sliding_window
    assert p.input_ids.count(262144) == n_images * MM_TOKENS
    got = np.asarray(ours(np.asarray(p.input_ids)[None], p.pixel_values))[0]
    want = _ref_logits(ref, p.input_ids, p.pixel_values)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_bidirectional_image_blocks_matter(tiny_mm, ours, processor):
    """Without the image blocks the logits differ (the test above would catch a causal-only mask)."""
    p = processor(_messages(random_images(3, [(64, 64)])))
    ids = jnp.asarray(p.input_ids)[None]
    soft = ours.encode_images(p.pixel_values)
    causal, _ = ours.decoder(ids, embeddings=ours.embed(ids, soft))
    full = ours(ids, p.pixel_values)
    assert float(jnp.max(jnp.abs(causal - full))) > 1e-3


def test_greedy_generation_matches_transformers(tiny_mm, hf_folder_tokenizer):
    folder, ref, ref_proc = tiny_mm
    model = load(folder)
    assert model.is_multimodal
    images = random_images(4, [(120, 80), (50, 70)])
    messages = _messages(images)
    done = model.chat_completion(messages, max_new_tokens=16, sampling=Sampling(),
                                 ignore_eos=True)
    p = model.multimodal.processor(messages)
    want = _ref_greedy(ref, p, 16)
    assert done.token_ids == want and len(want) == 16
    assert done.prompt_tokens == len(p.input_ids)
    streamed = "".join(model.chat_stream(messages, max_new_tokens=16, ignore_eos=True))
    assert streamed == hf_folder_tokenizer.decode(want)


def _ref_greedy(ref, p, n: int) -> list[int]:
    """transformers' greedy continuation (``n`` tokens, EOS ignored) of one processed prompt."""
    images = {}
    if len(p.pixel_values):
        images = {"pixel_values": torch.tensor(p.pixel_values).permute(0, 3, 1, 2)}
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor(p.input_ids)[None], **images,
                           token_type_ids=torch.tensor(p.token_type_ids)[None],
                           attention_mask=torch.ones(1, len(p.input_ids), dtype=torch.long),
                           max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(p.input_ids):].tolist()


def test_batch_of_conversations_matches_transformers_one_by_one(tiny_mm):
    """Three conversations of different lengths (1 image, 2 images, none) in one batch: each
    answer equals transformers' greedy answer to that conversation alone."""
    folder, ref, _ = tiny_mm
    model = load(folder)
    conversations = [
        _messages(random_images(11, [(80, 120)])),
        _messages(random_images(12, [(60, 60), (130, 90)]),
                  "Compare the two studies and list every change that you can see in them."),
        [{"role": "user", "content": "What is a pleural effusion?"}],
    ]
    done = model.chat_completions(conversations, max_new_tokens=12, sampling=Sampling(),
                                  ignore_eos=True)
    prompts = [model.multimodal.processor(m) for m in conversations]
    assert len({len(p.input_ids) for p in prompts}) == 3  # really padded rows
    for got, p in zip(done, prompts):
        assert got.prompt_tokens == len(p.input_ids)
        assert got.token_ids == _ref_greedy(ref, p, 12)


def test_image_token_from_config_when_the_tokenizer_files_lack_it(tiny_mm, tmp_path,
                                                                   gemma_tokenizer):
    """A folder whose tokenizer files (tokenizer.model alone) lack <image_soft_token> takes its
    id from config.json (image_token_index), as the model does, and answers as transformers;
    with neither, loading is one clear error."""
    import shutil

    folder, ref, _ = tiny_mm
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in folder.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, bare / f.name)
    gemma_tokenizer.save(bare)
    assert gemma_tokenizer.image_token_id is None
    model = load(bare)
    assert model.tokenizer.image_token_id == 262144 == ref.config.image_token_id
    messages = _messages(random_images(13, [(70, 90)]))
    p = model.multimodal.processor(messages)
    assert p.input_ids.count(262144) == MM_TOKENS
    done = model.chat_completion(messages, max_new_tokens=6, sampling=Sampling(),
                                 ignore_eos=True)
    assert done.token_ids == _ref_greedy(ref, p, 6)
    cfg = json.loads((bare / "config.json").read_text())
    del cfg["image_token_index"]
    (bare / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="image_token_index"):
        Processor.from_checkpoint(bare)


def test_projector_matches_transformers(tiny_mm, ours):
    _, ref, _ = tiny_mm
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 256, 24)).astype(np.float32)
    with torch.no_grad():
        want = ref.model.multi_modal_projector(torch.tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(ours.projector(jnp.asarray(x))), want, atol=1e-5)


def test_image_blocks_from_token_ids():
    ids = np.array([[2, 7, 255999, 9, 9, 9, 256000, 5, 255999, 9, 9, 256000, 9]])
    np.testing.assert_array_equal(np.asarray(image_blocks(ids, 9)),
                                  [[0, 0, 0, 1, 1, 1, 0, 0, 0, 2, 2, 0, 3]])


def test_sizes_come_from_the_config_and_are_checked():
    from medsiglip import SiglipVisionConfig

    cfg = MultimodalConfig.tiny()
    assert cfg.mm_tokens_per_image == 4 and cfg.pool == 2
    assert MultimodalConfig.medgemma_4b().pool == 4
    with pytest.raises(ValueError, match="not a square"):
        MultimodalConfig(cfg.text, cfg.vision, mm_tokens_per_image=8)
    with pytest.raises(ValueError, match="cannot be pooled"):
        MultimodalConfig(cfg.text, SiglipVisionConfig.tiny(image_size=24), mm_tokens_per_image=4)
    back = MultimodalConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict())))
    assert back == cfg


def test_image_count_mismatch_is_a_clear_error(ours, processor):
    p = processor(_messages(random_images(6, [(64, 64)])))
    with pytest.raises(ValueError, match="image tokens but 2 image"):
        ours(np.asarray(p.input_ids)[None], np.concatenate([p.pixel_values] * 2))


def test_4b_shapes_match_transformers_param_count():
    """``jax.eval_shape`` of the medgemma-4b config against transformers on the meta device."""
    import transformers
    from flax import nnx

    from medgemma_core.multimodal import Gemma3Multimodal

    cfg = MultimodalConfig.medgemma_4b()
    abstract = abstract_module(lambda rngs: Gemma3Multimodal(cfg, rngs=rngs))
    ours = sum(int(np.prod(x.shape)) for x in
               __import__("jax").tree.leaves(nnx.state(abstract, nnx.Param)))
    hf_cfg = transformers.Gemma3Config.from_dict(cfg.to_hf_dict())
    with torch.device("meta"):
        ref = transformers.Gemma3ForConditionalGeneration(hf_cfg)
    assert ours == sum(p.numel() for p in ref.parameters())
    assert 4_200_000_000 < ours < 4_400_000_000


def test_orbax_round_trip_and_load(tiny_mm, ours, processor, tmp_path, hf_folder_tokenizer):
    folder = save_multimodal(ours, tmp_path / "orbax", tokenizer=hf_folder_tokenizer)
    assert is_multimodal(folder)
    back = load_multimodal(folder)
    p = processor(_messages(random_images(7, [(64, 96)])))
    ids = np.asarray(p.input_ids)[None]
    np.testing.assert_array_equal(np.asarray(back(ids, p.pixel_values)),
                                  np.asarray(ours(ids, p.pixel_values)))
    again = Processor.from_checkpoint(folder)
    assert (again.config.image_size, again.config.mm_tokens_per_image) == (112, MM_TOKENS)
    model = load(folder)
    assert model.is_multimodal and model.multimodal.config == ours.config
    assert model.tokenizer.image_token_id == 262144


def test_sharded_bf16_checkpoint_with_new_prefixes(tmp_path, hf_folder_reference):
    """transformers 5 saves ``model.language_model.`` / ``model.vision_tower.`` /
    ``model.multi_modal_projector.``; shards with an index; bfloat16 weights."""
    folder = tmp_path / "bf16"
    ref = save_tiny_mm(folder, hf_folder_reference[1], seed=1, dtype=torch.bfloat16,
                       max_shard_size="10MB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1
    _rename_to_new_prefixes(folder, index)
    names = set(SafetensorsSource(folder).names())
    assert "model.language_model.embed_tokens.weight" in names
    assert "model.vision_tower.post_layernorm.weight" in names  # transformers 5: no vision_model.
    assert "model.multi_modal_projector.mm_input_projection_weight" in names
    model = load_multimodal(folder, dtype="bfloat16")
    assert model.decoder.embedding[...].dtype == jnp.bfloat16
    want = ref.model.multi_modal_projector.mm_input_projection_weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(model.projector.weight[...], np.float32), want)
    want = ref.model.vision_tower.post_layernorm.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(model.vision.post_layernorm.scale[...], np.float32),
                                  want)


def _rename_to_new_prefixes(folder, index):
    from safetensors.torch import load_file, save_file

    def new(name):
        for old, repl in (("language_model.model.", "model.language_model."),
                          ("vision_tower.", "model.vision_tower."),
                          ("multi_modal_projector.", "model.multi_modal_projector.")):
            if name.startswith(old):
                return repl + name[len(old):]
        return name

    for file in set(index["weight_map"].values()):
        tensors = load_file(folder / file)
        save_file({new(k): v for k, v in tensors.items()}, folder / file)
    index["weight_map"] = {new(k): v for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_broken_checkpoints_give_clear_errors(tiny_mm, tmp_path):
    import shutil

    from medgemma_core.checkpoints import CheckpointError

    folder = tmp_path / "broken"
    shutil.copytree(tiny_mm[0], folder)
    (folder / "model.safetensors").write_bytes((tiny_mm[0] / "model.safetensors").read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_multimodal(folder)
    cfg = json.loads((tiny_mm[0] / "config.json").read_text())
    cfg["mm_tokens_per_image"] = 15
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a square"):
        load_multimodal(folder)


def test_text_only_model_rejects_images():
    from medgemma_core.api import MedGemma

    model = MedGemma.__new__(MedGemma)
    model.multimodal, model.name = None, "gemma-270m"
    with pytest.raises(ValueError, match="text-only"):
        model.encode_chat(_messages(random_images(8, [(32, 32)])))


def test_projector_pools_row_major():
    """Hand-computed: a grid whose value is its row index pools to the mean row of each block."""
    from flax import nnx

    cfg = MultimodalConfig.tiny()  # 4x4 grid -> 2x2
    proj = Projector(cfg, rngs=nnx.Rngs(0))
    dv = cfg.vision.hidden_size
    rows = np.repeat(np.arange(4.0), 4)  # row-major: token r*4+c holds r
    x = np.broadcast_to(rows[None, :, None], (1, 16, dv)).astype(np.float32)
    proj.weight[...] = jnp.eye(dv, cfg.text.hidden_size)
    out = np.asarray(proj(jnp.asarray(x)))[0, :, 0]
    # pooled values 0.5, 0.5, 2.5, 2.5; RMSNorm of a constant vector c is sign(c) (w = 0)
    np.testing.assert_allclose(out, [1.0, 1.0, 1.0, 1.0], atol=1e-5)
    x2 = x * np.linspace(1, 2, dv)[None, None, :]
    out2 = np.asarray(proj(jnp.asarray(x2)))[0]
    pooled = np.array([0.5, 0.5, 2.5, 2.5])[:, None] * np.linspace(1, 2, dv)[None]
    normed = pooled / np.sqrt(np.mean(pooled**2, axis=-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(out2[:, :dv], normed, atol=1e-5)
    assert np.all(out2[:, dv:] == 0)


def test_cli_image_prompt_first_then_images(tiny_mm, tmp_path, capsys):
    from medgemma_core.cli import main

    folder = tiny_mm[0]
    files = []
    for i, arr in enumerate(random_images(9, [(80, 60), (60, 90)])):
        files.append(tmp_path / f"img{i}.png")
        from PIL import Image

        Image.fromarray(arr).save(files[-1])
    argv = ["generate", "--checkpoint", str(folder), "--prompt", "Compare these.",
            "--max-new-tokens", "5", "--ignore-eos", "--json"]
    for f in files:
        argv += ["--image", str(f)]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = load(folder)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Compare these."},
                                             {"type": "image", "image": files[0]},
                                             {"type": "image", "image": files[1]}]}]
    want = model.chat_completion(messages, max_new_tokens=5, sampling=Sampling(),
                                 ignore_eos=True)
    assert result["token_ids"] == want.token_ids and len(want.token_ids) == 5
    assert result["prompt_tokens"] == want.prompt_tokens == len(
        model.multimodal.processor(messages).input_ids)
    assert result["text"] == want.text and result["images"] == 2
    assert main(argv[:-2] + ["--image", str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.png" in err[0] and "no such file" in err[0]
