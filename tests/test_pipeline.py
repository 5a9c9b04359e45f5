"""Cross-package paths, each checked against transformers on the same input:
medgemma-data -> medsiglip (a radiograph into the encoder's preprocessing) and
medgemma-data -> medgemma-core (a QA sample into the chat prompt and the real 270M model)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import medgemma_data
import medsiglip

# The repository's fixtures/ folder; $MEDGEMMA_FIXTURES points the tests at another copy.
FIXTURES = Path(os.environ.get("MEDGEMMA_FIXTURES", Path(__file__).resolve().parents[1] / "fixtures"))


@pytest.fixture(scope="module")
def cxr_image():
    (sample,) = medgemma_data.load(FIXTURES / "cxr" / "siim_pneumothorax_sample.dcm")
    (image,) = sample.images
    assert image.dtype == np.uint8 and image.shape == (1024, 1024, 3)
    return image


def test_radiograph_into_medsiglip_matches_transformers_processor(cxr_image):
    from transformers import SiglipImageProcessor

    ours = np.asarray(medsiglip.preprocess([cxr_image], 448))
    ref = SiglipImageProcessor(size={"height": 448, "width": 448})(
        images=[cxr_image], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_radiograph_into_medgemma_processor_matches_transformers(cxr_image):
    from transformers import Gemma3ImageProcessor

    ours = np.asarray(medsiglip.preprocess([cxr_image], 896, resample="pil_bilinear"))
    ref = Gemma3ImageProcessor(size={"height": 896, "width": 896})(
        images=[cxr_image], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.fixture(scope="module")
def model():
    from medgemma_core import load

    return load()  # the embedded default: the real Gemma 3 270M


def test_qa_sample_through_the_chat_template(model):
    from transformers import AutoTokenizer

    from medgemma_core import default_checkpoint

    samples = medgemma_data.load(FIXTURES / "qa" / "medqa_sampled_50.jsonl")
    assert len(samples) == 50 and all(s.label in "ABCDE" for s in samples)
    question = samples[0].texts[0]
    messages = [{"role": "system", "content": "Answer with the letter of the best option."},
                {"role": "user", "content": question}]
    ids = model.encode_chat(messages)
    path = default_checkpoint()
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = ("<bos><start_of_turn>user\nAnswer with the letter of the best option.\n\n"
            f"{question.strip()}<end_of_turn>\n<start_of_turn>model\n")
    assert ids == ref(text, add_special_tokens=False)["input_ids"]
    answer = model.generate_ids([ids], max_new_tokens=6)[0]
    assert 1 <= len(answer.token_ids) <= 6 and answer.prompt_tokens == len(ids)
