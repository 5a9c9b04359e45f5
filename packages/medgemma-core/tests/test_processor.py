"""The processor against transformers' Gemma3Processor (PIL backend), and its training helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medgemma_core.chat import format_chat
from medgemma_core.processor import (
    IGNORE_INDEX,
    Processor,
    ProcessorConfig,
    pan_and_scan_boxes,
)
from medgemma_core.testing import IMAGE_SIZE, MM_TOKENS, random_images, reference_processor


@pytest.fixture(scope="module")
def ref_tok(hf_folder_reference):
    return hf_folder_reference[0]


@pytest.fixture(scope="module")
def ours(hf_folder_tokenizer):
    return Processor(hf_folder_tokenizer, ProcessorConfig(image_size=IMAGE_SIZE,
                                                          mm_tokens_per_image=MM_TOKENS))


def _conversation(images):
    content = [{"type": "text", "text": "What do you see?"}]
    content += [{"type": "image", "image": im} for im in images]
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content},
            {"role": "assistant", "content": "Two studies."},
            {"role": "user", "content": [{"type": "image", "image": images[0]},
                                         {"type": "text", "text": "And this one again?"}]}]


def _reference(proc, messages, pil_images, **kw):
    out = proc(text=format_chat(messages), images=pil_images, add_special_tokens=False,
               return_tensors="np", **kw)
    return (out["input_ids"][0].tolist(), out["pixel_values"].transpose(0, 2, 3, 1),
            out["token_type_ids"][0].tolist())


def test_ids_and_pixels_match_gemma3_processor(ours, ref_tok, fixtures_dir, tmp_path):
    arrays = random_images(0, [(90, 130), (300, 200)])
    gray = Image.fromarray(random_images(1, [(70, 70)])[0][..., 0], "L")
    rgba = Image.fromarray(np.dstack([random_images(2, [(60, 80)])[0],
                                      np.full((60, 80), 200, np.uint8)]), "RGBA")
    path = tmp_path / "photo.png"
    Image.fromarray(arrays[1]).save(path)
    cxr = fixtures_dir / "cxr" / "nih_cxr14_00000001_000.png"
    images = [arrays[0], gray, rgba, path, cxr]
    pil = [Image.fromarray(arrays[0]), gray, rgba, Image.open(path), Image.open(cxr)]
    got = ours(_conversation(images))
    ids, pixels, types = _reference(reference_processor(ref_tok), _conversation(images),
                                    pil + pil[:1])
    assert got.input_ids == ids
    assert got.token_type_ids == types
    assert got.input_ids.count(262144) == 6 * MM_TOKENS
    assert got.pixel_values.shape == (6, IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_allclose(got.pixel_values, pixels, atol=1e-6)


def test_pan_and_scan_matches_gemma3_processor(hf_folder_tokenizer, ref_tok):
    kw = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=64, pan_and_scan_max_num_crops=3,
              pan_and_scan_min_ratio_to_activate=1.2)
    ours = Processor(hf_folder_tokenizer, ProcessorConfig(image_size=IMAGE_SIZE,
                                                          mm_tokens_per_image=MM_TOKENS, **kw))
    wide, tall, square = random_images(3, [(100, 290), (260, 90), (120, 120)])
    messages = [{"role": "user", "content": [{"type": "image", "image": wide},
                                             {"type": "image", "image": Image.fromarray(tall)},
                                             {"type": "text", "text": "Any fracture?"},
                                             {"type": "image", "image": square}]}]
    got = ours(messages)
    ref = reference_processor(ref_tok, **kw)
    ids, pixels, _ = _reference(ref, messages, [Image.fromarray(a) for a in (wide, tall, square)],
                                **kw)  # the processor's own defaults override the image processor's
    assert got.num_crops == [3, 3, 0]
    assert got.input_ids == ids
    np.testing.assert_allclose(got.pixel_values, pixels, atol=1e-6)


def test_pan_and_scan_boxes_hand_computed():
    assert pan_and_scan_boxes(100, 110) == []  # ratio 1.1 < 1.2
    # 300 wide / 100 high: 3 crops of 100 columns
    assert pan_and_scan_boxes(100, 300, min_crop_size=50) == [
        (0, 0, 100, 100), (0, 100, 100, 200), (0, 200, 100, 300)]
    assert pan_and_scan_boxes(100, 300, min_crop_size=120) == []  # crops would be too small
    assert len(pan_and_scan_boxes(100, 1000, min_crop_size=10, max_num_crops=4)) == 4


def test_uint16_and_float_arrays(ours):
    """16-bit radiographs: value v -> (v / 65535 - 0.5) / 0.5 (hand-computed on flat images)."""
    flat16 = np.full((40, 50), 16384, np.uint16)
    flat_f = np.full((40, 50, 3), 0.75, np.float32)
    pixels, crops = ours.preprocess_images([flat16, flat_f])
    assert crops == [0, 0] and pixels.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_allclose(pixels[0], (16384 / 65535 - 0.5) / 0.5, atol=1e-5)
    np.testing.assert_allclose(pixels[1], 0.5, atol=1e-5)
    # a uint16 image scaled from uint8 gives the uint8 result up to rounding
    img8 = random_images(4, [(80, 60)])[0]
    p8, _ = ours.preprocess_images([img8])
    p16, _ = ours.preprocess_images([img8.astype(np.uint16) * 257])
    np.testing.assert_allclose(p16, p8, atol=2.5 / 255)


def test_mean_std_from_preprocessor_config(tmp_path, hf_folder_tokenizer):
    (tmp_path / "config.json").write_text(json.dumps(
        {"vision_config": {"image_size": 28}, "mm_tokens_per_image": 4}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0], "do_pan_and_scan": True}))
    proc = Processor.from_checkpoint(tmp_path, hf_folder_tokenizer)
    assert proc.config.image_size == 28 and proc.config.mm_tokens_per_image == 4
    assert proc.config.do_pan_and_scan is True
    pixels, _ = proc.preprocess_images([np.full((28, 28), 51, np.uint8)])
    np.testing.assert_allclose(pixels, 0.2, atol=1e-6)  # 51 / 255, no normalization


def test_collate_right_pads_and_masks_labels(ours, hf_folder_tokenizer):
    tok = hf_folder_tokenizer
    img = random_images(5, [(64, 64)])
    long = [{"role": "user", "content": [{"type": "text", "text": "Describe."},
                                         {"type": "image", "image": img[0]}]},
            {"role": "assistant", "content": "A normal chest radiograph without findings."}]
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    a, b = (ours(m, add_generation_prompt=False) for m in (long, short))
    batch = ours.collate([a, b], pad_to_multiple_of=8)
    t = batch.input_ids.shape[1]
    assert t % 8 == 0 and t >= len(a.input_ids)
    assert batch.input_ids[1, :len(b.input_ids)].tolist() == b.input_ids
    assert (batch.input_ids[1, len(b.input_ids):] == 0).all()  # right padding with <pad>
    assert batch.attention_mask.sum(1).tolist() == [len(a.input_ids), len(b.input_ids)]
    for row in range(2):
        for pos in range(t):
            tid = int(batch.input_ids[row, pos])
            masked = tid in (0, 262144, 255999)
            assert (batch.labels[row, pos] == IGNORE_INDEX) == masked
            if not masked:
                assert batch.labels[row, pos] == tid
    assert (batch.labels[0] == 256000).sum() == 1  # <end_of_image> keeps its label
    assert batch.pixel_values.shape[0] == 1 and batch.images_per_row == [1, 0]
    assert batch.token_type_ids.sum() == MM_TOKENS
    answer_only = ours.collate([a], mask_prompt=True)
    kept = [int(i) for i in answer_only.labels[0] if i != IGNORE_INDEX]
    assert tok.decode(kept) == "A normal chest radiograph without findings.<end_of_turn>\n"
    # cut before its answer starts: no loss at all (never labels on the prompt)
    short = ours.collate([a], mask_prompt=True, max_length=len(a.input_ids) - len(kept) - 2)
    assert (short.labels == IGNORE_INDEX).all()
    # cut inside the answer: only the answer's first tokens carry labels
    part = ours.collate([a], mask_prompt=True, max_length=len(a.input_ids) - 3)
    kept_part = [int(i) for i in part.labels[0] if i != IGNORE_INDEX]
    assert kept_part == kept[:len(kept) - 3] and kept_part
    with pytest.raises(ValueError, match="cut an image"):
        ours.collate([a], max_length=10)
    assert ours.collate([b], max_length=5).input_ids.shape == (1, 5)


def test_bad_input_gives_clear_errors(ours, gemma_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="1 <start_of_image> placeholder"):
        ours.process_text("<start_of_image>", [])
    with pytest.raises(ValueError, match="under 'image'"):
        ours([{"role": "user", "content": [{"type": "image"}]}])
    with pytest.raises(FileNotFoundError, match="no such image"):
        ours([{"role": "user", "content": [{"type": "image", "image": tmp_path / "x.png"}]}])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        ours([{"role": "user", "content": [{"type": "image", "image": tmp_path / "bad.png"}]}])
    with pytest.raises(ValueError, match="no <image_soft_token>"):
        Processor(gemma_tokenizer)  # the 270M text tokenizer has no image token
