"""medgemma-core and medsiglip: checkpoint headers and indexes, config.json, tokenizer files,
images. Fuzzed through the packages' public functions only.

Documented errors: :class:`medsiglip.weights.CheckpointError` (a ``ValueError``) for
checkpoints; ``ValueError`` for config mappings, tokenizer files and images (the tokenizer and
``load_image`` also raise ``FileNotFoundError`` for a missing file).

A multi-file input (a checkpoint folder) is fuzzed one file at a time: the input's first byte
picks which file of the folder it replaces, the others are valid, generated ones.
"""

from __future__ import annotations

import functools
import io
import json
import math
import tempfile
from pathlib import Path

import numpy as np

from . import seeds as S
from .engine import ContractViolation, Target

CORE = ("medgemma_core", "medsiglip", "json")


def checkpoint_errors() -> tuple[type[BaseException], ...]:
    from medsiglip.weights import CheckpointError

    return (CheckpointError,)


def value_errors() -> tuple[type[BaseException], ...]:
    return (ValueError, FileNotFoundError)


# ---- generated checkpoint files ------------------------------------------------------------

_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32"}


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    """A safetensors file, written by hand (the format: 8-byte header length, JSON, data)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, arr in tensors.items():
        data = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": _ST_DTYPES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + b"".join(blobs)


def _random(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.1


GEMMA_HF = {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
            "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
            "query_pre_attn_scalar": 4, "sliding_window": 4, "sliding_window_pattern": 2,
            "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 64, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}


@functools.cache
def gemma_tensors() -> dict[str, np.ndarray]:
    from medgemma_core.checkpoints.names import text_specs
    from medgemma_core.config import Gemma3Config

    cfg = Gemma3Config.from_hf_dict(GEMMA_HF)
    return {s.name: _random(s.shape, i) for i, s in enumerate(text_specs(cfg, "model."))
            if s.shape is not None}


VISION_HF = {"model_type": "siglip_vision_model", "hidden_size": 8, "intermediate_size": 16,
             "num_hidden_layers": 1, "num_attention_heads": 2, "patch_size": 4, "image_size": 8,
             "vision_use_head": False}


@functools.cache
def vision_tensors() -> dict[str, np.ndarray]:
    from medsiglip.checkpoints.convert import vision_specs
    from medsiglip.config import SiglipVisionConfig

    cfg = SiglipVisionConfig.from_hf_dict(VISION_HF)
    n_pos = (cfg.image_size // cfg.patch_size) ** 2
    out = {}
    for i, s in enumerate(vision_specs(cfg, "vision_model.")):
        shape = s.shape if s.shape is not None else (n_pos, cfg.hidden_size)
        out[s.name] = _random(shape, i)
    return out


def _shards(tensors: dict[str, np.ndarray]) -> tuple[dict[str, bytes], bytes]:
    names = list(tensors)
    half = len(names) // 2
    files = {"model-00001-of-00002.safetensors": {n: tensors[n] for n in names[:half]},
             "model-00002-of-00002.safetensors": {n: tensors[n] for n in names[half:]}}
    index = {"metadata": {"total_size": 0},
             "weight_map": {n: f for f, part in files.items() for n in part}}
    return ({f: safetensors_bytes(part) for f, part in files.items()},
            json.dumps(index).encode())


def _check_source(src: object) -> None:
    """Every tensor a source lists has a shape of whole numbers and reads back as it."""
    for name in src.names():
        shape = src.shape(name)
        if not (isinstance(shape, tuple) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ContractViolation(f"tensor {name!r}: shape {shape!r}")
        if math.prod(shape) > 1 << 22:
            continue  # a large claim: reading it is the bomb test's business, not the fuzzer's
        arr = np.asarray(src.get(name))
        if tuple(arr.shape) != shape:
            raise ContractViolation(f"tensor {name!r}: read {arr.shape}, claimed {shape}")


# ---- core.safetensors: a Hugging Face folder through text_source -----------------------------

def _st_seeds(_: Path) -> list[bytes]:
    shards, index = _shards(gemma_tensors())
    one = safetensors_bytes(gemma_tensors())
    return [S.tag(0, one), S.tag(1, index), S.tag(2, shards["model-00001-of-00002.safetensors"]),
            S.tag(3, json.dumps(GEMMA_HF).encode())]


def _st_run(data: bytes, folder: Path) -> None:
    from medgemma_core.checkpoints import text_source

    which, body = (data[0] % 4 if data else 0), data[1:]
    ckpt = folder / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(GEMMA_HF))
    if which in (0, 3):
        (ckpt / "model.safetensors").write_bytes(safetensors_bytes(gemma_tensors()))
    else:
        shards, index = _shards(gemma_tensors())
        for f, b in shards.items():
            (ckpt / f).write_bytes(b)
        (ckpt / "model.safetensors.index.json").write_bytes(index)
    target = {0: "model.safetensors", 1: "model.safetensors.index.json",
              2: "model-00001-of-00002.safetensors", 3: "config.json"}[which]
    (ckpt / target).write_bytes(body)
    src, cfg, prefix = text_source(ckpt)
    from medgemma_core.config import Gemma3Config

    if not isinstance(cfg, Gemma3Config) or not isinstance(prefix, str):
        raise ContractViolation(f"text_source gave {type(cfg).__name__}, {prefix!r}")
    _check_source(src)


# ---- core.gguf: a GGUF file through text_source, and its tokenizer -------------------------

@functools.cache
def gguf_seeds() -> list[bytes]:
    import gguf

    out = []
    tensors = gemma_tensors()
    gguf_names = {"model.embed_tokens.weight": "token_embd.weight",
                  "model.norm.weight": "output_norm.weight"}
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
             "mlp.down_proj": "ffn_down"}
    for quantize in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tiny.gguf"
            w = gguf.GGUFWriter(str(path), "gemma3")
            w.add_context_length(64)
            w.add_embedding_length(8)
            w.add_block_count(2)
            w.add_feed_forward_length(16)
            w.add_head_count(2)
            w.add_head_count_kv(1)
            w.add_key_length(4)
            w.add_value_length(4)
            w.add_layer_norm_rms_eps(1e-6)
            w.add_rope_freq_base(1e6)
            w.add_sliding_window(4)
            w.add_tokenizer_model("llama")
            pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                      "▁", "a", "b", "▁a", "▁b", "ab", "\n", "c", "▁c"]
            pieces += [f"<0x{i:02X}>" for i in range(256)]
            w.add_token_list(pieces)
            w.add_token_scores([0.0] * 6 + [-float(i) for i in range(len(pieces) - 6)])
            w.add_token_types([3, 3, 3, 2, 3, 3] + [1] * 6 + [4, 1, 1] + [6] * 256)
            for hf, arr in tensors.items():
                name = gguf_names.get(hf)
                if name is None:
                    _, _, i, rest = hf.split(".", 3)
                    short = layer.get(rest.removesuffix(".weight"))
                    if short is None:
                        continue
                    name = f"blk.{i}.{short}.weight"
                if quantize and arr.ndim == 2 and arr.shape[-1] % 32 == 0:
                    q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
                    w.add_tensor(name, q, raw_shape=q.shape,
                                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                elif quantize and arr.ndim == 1:
                    w.add_tensor(name, arr.astype(np.float16))
                else:
                    w.add_tensor(name, arr)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            out.append(path.read_bytes())
    return out


def _gguf_run(data: bytes, folder: Path) -> None:
    from medgemma_core.checkpoints import text_source
    from medgemma_core.config import Gemma3Config

    path = folder / "model.gguf"
    path.write_bytes(data)
    src, cfg, _ = text_source(path)
    if not isinstance(cfg, Gemma3Config):
        raise ContractViolation(f"text_source gave {type(cfg).__name__}")
    _check_source(src)


# ---- core.config: config.json -> config, for every mapping ---------------------------------

MM_HF = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
         "text_config": {k: v for k, v in GEMMA_HF.items() if k != "architectures"},
         "vision_config": {k: v for k, v in VISION_HF.items() if k != "model_type"},
         "mm_tokens_per_image": 4, "image_token_index": 15, "boi_token_index": 13,
         "eoi_token_index": 14}
SIGLIP_HF = {"model_type": "siglip", "vision_config": {**VISION_HF, "vision_use_head": True},
             "text_config": {"vocab_size": 32, "hidden_size": 8, "intermediate_size": 16,
                             "num_hidden_layers": 1, "num_attention_heads": 2,
                             "max_position_embeddings": 8, "projection_size": 8}}
CONFIGS = (GEMMA_HF, MM_HF, SIGLIP_HF, VISION_HF)


def _config_run(data: bytes, folder: Path) -> None:
    """config.json bytes -> read_hf_config -> the mapping the first byte picks."""
    from medgemma_core.config import Gemma3Config
    from medgemma_core.multimodal import MultimodalConfig
    from medsiglip.checkpoints.hf import vision_config_of
    from medsiglip.config import SiglipConfig
    from medsiglip.weights import read_hf_config

    which, body = (data[0] % 4 if data else 0), data[1:]
    (folder / "config.json").write_bytes(body)
    raw = read_hf_config(folder)
    mapping = {0: Gemma3Config.from_hf_dict, 1: MultimodalConfig.from_hf_dict,
               2: SiglipConfig.from_hf_dict, 3: vision_config_of}[which]
    cfg = mapping(raw)
    if not hasattr(cfg, "__dataclass_fields__"):
        raise ContractViolation(f"{mapping.__qualname__} gave {type(cfg).__name__}")


# ---- core.tokenizer: tokenizer.model, tokenizer_config.json, tokenizer.json, GGUF vocab -----

SPECIAL = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"]


@functools.cache
def sentencepiece_model() -> bytes:
    import sentencepiece as spm

    corpus = ["the chest radiograph shows no acute findings", "a small left pleural effusion",
              "heart size is normal", "lungs are clear", "no pneumothorax is seen"] * 8
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, model_type="bpe", vocab_size=300, hard_vocab_limit=False,
        user_defined_symbols=SPECIAL, byte_fallback=True, pad_id=0, eos_id=1, bos_id=2,
        normalization_rule_name="identity",
        unk_id=3, minloglevel=2)
    return buf.getvalue()


def _tokenizer_config(n: int) -> bytes:
    return json.dumps({"added_tokens_decoder": {
        "0": {"content": "<pad>", "special": True}, str(n): {"content": "<image_soft_token>",
                                                              "special": True}}}).encode()


def _tokenizer_json(n: int) -> bytes:
    return json.dumps({"version": "1.0", "added_tokens": [
        {"id": 1, "content": "</s>", "special": True},
        {"id": n, "content": "<image_soft_token>", "special": True}],
        "model": {"type": "BPE"}}).encode()


TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "tokenizer.json", "model.gguf")


def _n_pieces() -> int:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(sentencepiece_model())
    return len(proto.pieces)


def _tok_seeds(_: Path) -> list[bytes]:
    n = _n_pieces()
    return [S.tag(0, sentencepiece_model()), S.tag(1, _tokenizer_config(n)),
            S.tag(2, _tokenizer_json(n)), *(S.tag(3, g) for g in gguf_seeds())]


def _tok_run(data: bytes, folder: Path) -> None:
    from medgemma_core.tokenizer import Tokenizer

    which, body = (data[0] % 4 if data else 0), data[1:]
    ckpt = folder / "ckpt"
    ckpt.mkdir()
    if which == 3:
        (ckpt / "model.gguf").write_bytes(body)
    else:
        n = _n_pieces()
        files = {"tokenizer.model": sentencepiece_model()}
        if which == 1:
            files["tokenizer_config.json"] = _tokenizer_config(n)
        if which == 2:
            files["tokenizer.json"] = _tokenizer_json(n)
        files[TOKENIZER_FILES[which]] = body
        for name, b in files.items():
            (ckpt / name).write_bytes(b)
    tok = Tokenizer.from_checkpoint(ckpt)
    ids = tok.encode("no acute findings\n<start_of_turn>user", add_bos=True)
    if not all(isinstance(i, int) and 0 <= i < len(tok) for i in ids):
        raise ContractViolation(f"encode gave ids outside the vocabulary: {ids[:10]}")
    if not isinstance(tok.decode(ids), str):
        raise ContractViolation("decode did not give a str")


# ---- images: medsiglip.load_image -> preprocess, and the core's Processor ------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".bmp", ".webp", ".tif")


def _image_seeds(_: Path) -> list[bytes]:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.arange(96).reshape(8, 12) * 600).astype(np.uint16)).save(buf, "TIFF")
    return [S.tag(IMAGE_SUFFIXES.index(sfx), d) for sfx, d in S.images()] + \
        [S.tag(4, buf.getvalue())]


def _check_pixels(pixels: object, size: int) -> None:
    arr = np.asarray(pixels)
    if arr.ndim != 4 or arr.shape[1:] != (size, size, 3) or not np.all(np.isfinite(arr)) \
            or arr.min() < -1.0 - 1e-6 or arr.max() > 1.0 + 1e-6:
        raise ContractViolation(f"pixels of shape {arr.shape}, range "
                                f"[{arr.min() if arr.size else '-'}, "
                                f"{arr.max() if arr.size else '-'}]")


def _siglip_image(data: bytes, folder: Path) -> None:
    import medsiglip

    suffix, body = S.untag(data, IMAGE_SUFFIXES)
    path = folder / f"image{suffix}"
    path.write_bytes(body)
    image = medsiglip.load_image(path)
    _check_pixels(medsiglip.preprocess(image, 16), 16)


@functools.cache
def _tokenizer_with_image_tokens() -> object:
    from medgemma_core.tokenizer import Tokenizer

    n = _n_pieces()
    return Tokenizer(sentencepiece_model(), added_tokens={n: "<image_soft_token>"},
                     special_ids=[n])


def _core_image(data: bytes, folder: Path) -> None:
    """An image file through the core's Processor (pan and scan on for wide images)."""
    from medgemma_core.processor import Processor, ProcessorConfig

    suffix, body = S.untag(data, IMAGE_SUFFIXES)
    path = folder / f"image{suffix}"
    path.write_bytes(body)
    config = ProcessorConfig(image_size=16, mm_tokens_per_image=4, do_pan_and_scan=True,
                             pan_and_scan_min_crop_size=4)
    pixels, crops = Processor(_tokenizer_with_image_tokens(), config).preprocess_images([path])
    _check_pixels(pixels, 16)
    if len(crops) != 1 or pixels.shape[0] != 1 + crops[0]:
        raise ContractViolation(f"{pixels.shape[0]} images for crops {crops}")


# ---- siglip.checkpoint: a vision tower folder ----------------------------------------------

def _vision_seeds(_: Path) -> list[bytes]:
    shards, index = _shards(vision_tensors())
    return [S.tag(0, json.dumps(VISION_HF).encode()),
            S.tag(1, safetensors_bytes(vision_tensors())), S.tag(2, index),
            S.tag(3, shards["model-00002-of-00002.safetensors"])]


def _vision_run(data: bytes, folder: Path) -> None:
    import medsiglip

    which, body = (data[0] % 4 if data else 0), data[1:]
    ckpt = folder / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(VISION_HF))
    if which in (0, 1):
        (ckpt / "model.safetensors").write_bytes(safetensors_bytes(vision_tensors()))
    else:
        shards, index = _shards(vision_tensors())
        for f, b in shards.items():
            (ckpt / f).write_bytes(b)
        (ckpt / "model.safetensors.index.json").write_bytes(index)
    target = {0: "config.json", 1: "model.safetensors", 2: "model.safetensors.index.json",
              3: "model-00002-of-00002.safetensors"}[which]
    (ckpt / target).write_bytes(body)
    try:
        raw = json.loads((ckpt / "config.json").read_bytes())
    except ValueError:
        raw = None  # load_vision_tower must refuse it
    if isinstance(raw, dict) and not _tiny_enough(raw):
        # a large config builds a large model: the reader's part is the config mapping
        from medsiglip.checkpoints.hf import vision_config_of
        from medsiglip.weights import read_hf_config

        try:
            vision_config_of(read_hf_config(ckpt))
        except ValueError:  # vision_config_of's documented error (CheckpointError included)
            pass
        return
    tower = medsiglip.load_vision_tower(ckpt)
    if not isinstance(tower, medsiglip.VisionTower):
        raise ContractViolation(f"load_vision_tower gave {type(tower).__name__}")


def _tiny_enough(raw: dict) -> bool:
    try:
        h = int(raw.get("hidden_size", 768))
        n = int(raw.get("num_hidden_layers", 12))
        f = int(raw.get("intermediate_size", 3072))
        s = raw.get("image_size", 224)
        s = int(s[0] if isinstance(s, (list, tuple)) and s else s)
    except (TypeError, ValueError, OverflowError):
        return True  # the mapping itself must refuse it
    return h * (h + f) * max(n, 1) <= 1 << 16 and s <= 64


TARGETS = [
    Target("core.safetensors", "medgemma-core", _st_run, checkpoint_errors, _st_seeds,
           CORE, "text_source(folder): safetensors headers, the shard index, config.json"),
    Target("core.gguf", "medgemma-core", _gguf_run, checkpoint_errors,
           lambda _: gguf_seeds(), CORE + ("gguf",),
           "text_source(file.gguf): the GGUF header index, its config, tensor reads"),
    Target("core.config", "medgemma-core", _config_run, value_errors,
           lambda _: [S.tag(k, json.dumps(c).encode()) for k, c in enumerate(CONFIGS)], CORE,
           "config.json -> Gemma3Config / MultimodalConfig / SiglipConfig / vision config"),
    Target("core.tokenizer", "medgemma-core", _tok_run, value_errors, _tok_seeds,
           CORE + ("sentencepiece",),
           "Tokenizer.from_checkpoint: tokenizer.model, tokenizer_config.json, tokenizer.json, "
           "GGUF vocabulary"),
    Target("core.image", "medgemma-core", _core_image, value_errors, _image_seeds,
           CORE + ("PIL",), "Processor.preprocess_images on an image file (pan and scan)"),
    Target("siglip.image", "medsiglip", _siglip_image, value_errors, _image_seeds,
           ("medsiglip", "PIL"), "medsiglip.load_image -> preprocess"),
    Target("siglip.checkpoint", "medsiglip", _vision_run, checkpoint_errors, _vision_seeds,
           ("medsiglip", "json"), "load_vision_tower(folder): config.json, safetensors, index"),
]
