"""A real browser against the real app: headless Chromium driven by Playwright.

Starts ``medgemma-demo`` (the embedded Gemma 3 270M) as a subprocess, then in the page: types a
question and watches the answer stream in, uploads the CXR DICOM fixture and finds it in the
"what the model sees" gallery, and saves screenshots (the path is printed).

Run with ``nox -s browser`` (or ``pytest -m browser``). Needs Chromium (Debian: ``apt-get
install chromium``); ``CHROMIUM`` overrides its path, ``MEDGEMMA_SCREENSHOTS`` the output folder.
"""

from __future__ import annotations

import io
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, free_port

pytestmark = pytest.mark.browser

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ANSWER_TIMEOUT_S = 600


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        pytest.fail("no Chromium found; install it (apt-get install -y chromium) or set CHROMIUM")
    return path


@pytest.fixture(scope="module")
def server():
    """``medgemma-demo`` in a subprocess; yields (url, seconds until the URL was printed)."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "medgemma_demo", "--port", str(port),
                             "--max-new-tokens", "24"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []

    def pump():
        for line in proc.stdout:  # type: ignore[union-attr]
            log.append(line)
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    url = None
    while url is None and time.monotonic() - start < 180:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        if "running on http" in line:
            url = line.split("running on ", 1)[1].split()[0]
    if url is None:
        proc.kill()
        pytest.fail("medgemma-demo did not print its URL:\n" + "".join(log[-30:]))
    yield url, time.monotonic() - start, log
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=chromium_path(),
            headless=True, args=FLAGS, viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(60_000)
        yield page
        context.close()


def screenshot_dir() -> Path:
    folder = Path(os.environ.get("MEDGEMMA_SCREENSHOTS", ROOT / "out" / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_chat_streams_and_upload_shows_in_gallery(server, page, cxr_dcm):
    url, url_s, log = server
    t0 = time.monotonic()
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#notice")
    page.wait_for_selector("#chat-input textarea")
    usable_s = url_s + time.monotonic() - t0
    print(f"\npage usable {usable_s:.1f} s after starting medgemma-demo (URL after {url_s:.1f} s)")
    assert "Research use only" in page.inner_text("#notice")
    assert "Gemma 3 270M" in page.inner_text("#default-model-note")

    # Type a question; the answer must appear piece by piece.
    page.fill("#chat-input textarea", "What is a pneumothorax?")
    page.click("#send-btn")
    assert "What is a pneumothorax?" in page.inner_text('#chatbot [data-testid="user"]')
    snapshots: list[str] = []
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    final = None
    while time.monotonic() < deadline:
        bots = page.locator('#chatbot [data-testid="bot"]')
        text = bots.last.inner_text() if bots.count() else ""
        if text and (not snapshots or snapshots[-1] != text):
            snapshots.append(text)
        if text and "▌" not in text and "waiting for the model" not in text:
            final = text
            break
        time.sleep(0.1)
    assert final is not None, f"no complete answer within {ANSWER_TIMEOUT_S} s: {snapshots[-3:]}"
    streamed = [s.rstrip("▌") for s in snapshots if s.endswith("▌")]
    assert len(streamed) >= 2, f"the answer did not stream: {snapshots}"
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(streamed, streamed[1:]))
    assert final.startswith(streamed[-1])
    print(f"answer streamed in {len(streamed)} visible steps: {final!r}")

    # Upload the CXR DICOM; it must appear in "What the model sees".
    page.set_input_files("#upload input[type=file]", str(cxr_dcm))
    page.wait_for_selector("#gallery img", timeout=180_000)
    assert "radiograph" in page.inner_text("#gallery")
    status = page.inner_text("#upload-status")
    assert "radiograph, 1 sample(s), 1 image(s)" in status and "text-only" in status
    src = page.locator("#gallery img").first.get_attribute("src")
    shown = _fetch_image(page, src)
    _assert_same_picture(shown, cxr_dcm)

    path = screenshot_dir() / "demo.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    assert path.stat().st_size > 10_000


def test_plugins_and_medsiglip_tabs(server, page):
    page.get_by_role("tab", name="Plugins").click()
    table = page.inner_text("#plugins")
    for name in ("radiograph", "ct", "wsi", "medgemma-data"):
        assert name in table
    page.get_by_role("tab", name="MedSigLIP zero-shot").click()
    assert "--medsiglip" in page.inner_text("#medsiglip-missing")
    path = screenshot_dir() / "demo-plugins.png"
    page.get_by_role("tab", name="Plugins").click()
    page.screenshot(path=str(path), full_page=True)
    print(f"\nscreenshot: {path}")


def test_bad_upload_shows_an_error_in_the_page(server, page, tmp_path):
    page.get_by_role("tab", name="Chat").click()
    page.click("#clear-btn")
    page.wait_for_function("!document.querySelector('#chatbot [data-testid=\"bot\"]') && "
                           "!document.querySelector('#gallery img')", timeout=60_000)
    bad = tmp_path / "broken_scan.dcm"
    bad.write_bytes(b"this is not a DICOM file" * 20)
    page.set_input_files("#upload input[type=file]", str(bad))
    # the reason stays under the upload box (a warning toast also shows it for 10 s)
    page.wait_for_function("document.querySelector('#upload-status').innerText.includes("
                           "'Could not read')", timeout=180_000)
    status = page.inner_text("#upload-status")
    assert "broken_scan.dcm" in status and "Read as" in status
    assert "Traceback" not in status and 'File "' not in status
    assert page.locator("#gallery img").count() == 0
    path = screenshot_dir() / "demo-error.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"\nscreenshot: {path}")


def _fetch_image(page, src: str) -> np.ndarray:
    from PIL import Image

    data = page.request.get(src).body()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _assert_same_picture(shown: np.ndarray, dcm: Path) -> None:
    """The gallery image is the radiograph pydicom decodes (resized): correlation near 1."""
    import pydicom
    from PIL import Image

    ref = pydicom.dcmread(dcm).pixel_array
    h, w = shown.shape[:2]
    ref_small = np.asarray(Image.fromarray(ref).resize((w, h), Image.Resampling.BOX), float)
    corr = np.corrcoef(ref_small.ravel(), shown[..., 0].astype(float).ravel())[0, 1]
    assert corr > 0.98, corr
