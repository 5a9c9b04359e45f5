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
    yield from _serve(["--max-new-tokens", "24"])


def _serve(args):
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "medgemma_demo", "--port", str(port), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
def browser_context(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=chromium_path(),
            headless=True, args=FLAGS, viewport={"width": 1400, "height": 1000},
            accept_downloads=True)
        yield context
        context.close()


@pytest.fixture(scope="module")
def page(server, browser_context):
    page = browser_context.new_page()
    page.set_default_timeout(60_000)
    yield page
    page.close()


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
    missing = page.inner_text("#medsiglip-missing")
    # off out of the box, and it says how to turn it on, in the way the demo was started
    assert "This tab is off" in missing and "python -m medgemma_demo --medsiglip" in missing
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
    assert "broken_scan.dcm" in status and "'Read as' modality" in status
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


def _ask(page, question: str, during=None, timeout_s: float = ANSWER_TIMEOUT_S) -> str:
    """Send ``question``; wait for its answer to be complete (no cursor); ``during()`` runs
    while it streams."""
    bots = page.locator('#chatbot [data-testid="bot"]')
    before = bots.count()
    page.fill("#chat-input textarea", question)
    page.click("#send-btn")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = bots.last.inner_text() if bots.count() > before else ""
        if text and "▌" in text and during is not None:
            during()
        if text and "▌" not in text and "waiting for the model" not in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"no complete answer within {timeout_s} s")


BUSY = "#upload .generating, #upload .progress-text, #upload .eta-bar"


def test_frictions_of_a_first_user(server, page, tmp_path):
    """The page says which prompt mode runs and how it was started; an answer leaves the
    upload box alone; Send takes the attachment (the gallery empties); a cut-off says so;
    a slide's reading options are on the page."""
    page.goto(server[0], wait_until="domcontentloaded")
    page.wait_for_selector("#model-status")
    page.wait_for_function("document.querySelector('#model-status').innerText.includes("
                           "'Ready')", timeout=ANSWER_TIMEOUT_S * 1000)
    status = page.inner_text("#model-status")
    assert "base-model mode" in status and "up to 8 questions decoded together" in status
    assert "python -m medgemma_demo --checkpoint" in page.inner_text("#default-model-note")

    # attach a QA file (its first question), ask; the upload box shows no progress meanwhile
    from conftest import fixtures_dir

    page.set_input_files("#upload input[type=file]",
                         str(fixtures_dir() / "qa" / "medqa_sampled_50.jsonl"))
    page.wait_for_function("document.querySelector('#upload-status').innerText.includes("
                           "'1 of 50')", timeout=180_000)
    busy: list[int] = []
    _ask(page, "Answer with the letter.", during=lambda: busy.append(page.locator(BUSY).count()))
    assert busy and max(busy) == 0, "the upload box showed progress during the answer"
    assert page.locator("#gallery img").count() == 0
    assert "Sent with your question" in page.inner_text("#upload-status")

    # the server's 24-token limit: a long answer says it was cut, and where to raise it
    cut = _ask(page, "Describe the anatomy of the human heart in detail.")
    assert "cut at 24 tokens: raise Max new tokens under Settings" in cut

    # the bundled slide: too strict a min_tissue says which option to lower, and where
    page.get_by_text("Read options").first.click()
    page.fill("#read-options input", "min_tissue=0.99")
    page.set_input_files("#upload input[type=file]", str(fixtures_dir() / "wsi" / "small.svs"))
    page.wait_for_function("document.querySelector('#upload-status').innerText.includes("
                           "'Could not read')", timeout=180_000)
    assert "min_tissue (in the 'Read options')" in page.inner_text("#upload-status")
    assert "min_tissue=0.25" in page.inner_text("#read-options-help")
    page.fill("#read-options input", "min_tissue=0.01")
    page.press("#read-options input", "Enter")
    page.wait_for_selector("#gallery img", timeout=180_000)
    assert "wsi" in page.inner_text("#upload-status")
    path = screenshot_dir() / "demo-frictions.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"\nscreenshot: {path}")


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """The demo on a tiny random Gemma 3 (the real tokenizer): a training run takes seconds."""
    from conftest import save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ckpt"))
    runs = tmp_path_factory.mktemp("runs")
    yield from _serve(["--checkpoint", str(folder), "--max-new-tokens", "8", "--no-warmup",
                       "--runs-dir", str(runs)])


def test_train_then_evaluate_the_adapter(tiny_server, browser_context, tmp_path):
    page = browser_context.new_page()
    page.set_default_timeout(60_000)
    page.goto(tiny_server[0], wait_until="domcontentloaded")
    page.get_by_role("tab", name="Train").click()
    assert "One run at a time per server" in page.inner_text("#train-intro")
    page.fill("#train-steps input[type=number]", "4")
    page.press("#train-steps input[type=number]", "Enter")
    page.fill("#train-rank input[type=number]", "4")
    page.press("#train-rank input[type=number]", "Enter")
    page.click("#train-start")
    # the loss curve fills in while it runs, then the adapter can be downloaded
    # (a failed run ends the wait at once: its status line names the error)
    for ended in ("'Training', 'Done'", "'Done'"):
        page.wait_for_function(f"[{ended}, 'Failed'].some(w => document.querySelector("
                               "'#train-status').innerText.includes(w))", timeout=600_000)
        status = page.inner_text("#train-status")
        assert "Failed" not in status, status
    assert "step **4 / 4**" in status or "step 4 / 4" in status, status
    page.wait_for_selector("#train-loss canvas, #train-loss svg", timeout=60_000)
    with page.expect_download(timeout=60_000) as info:
        page.click("#train-download")
    saved = tmp_path / "adapter.zip"
    info.value.save_as(saved)
    import zipfile

    names = zipfile.ZipFile(saved).namelist()
    assert "adapter_config.json" in names and "adapter_model.safetensors" in names
    # the fine-tuned model answers beside the base one
    page.fill("#compare-question textarea", "What is a fracture?")
    page.click("#compare-ask")
    page.wait_for_function("document.querySelector('#compare-tuned textarea').value.length > 0",
                           timeout=300_000)
    assert page.input_value("#compare-base textarea") is not None
    page.screenshot(path=str(screenshot_dir() / "demo-train.png"), full_page=True)

    # Evaluate the adapter just trained: the chart and the per-item table appear
    page.get_by_role("tab", name="Evaluate").click()
    page.get_by_label("fine-tuned (last Train run)").check()
    page.fill("#eval-n input[type=number]", "3")
    page.press("#eval-n input[type=number]", "Enter")
    page.click("#eval-start")
    page.wait_for_function("document.querySelector('#eval-status').innerText.includes("
                           "'95% CI')", timeout=600_000)
    assert "medqa · fine-tuned" in page.inner_text("#eval-status")
    page.wait_for_selector("#eval-chart canvas, #eval-chart svg", timeout=60_000)
    table = page.inner_text("#eval-items")
    assert "gold" in table and "correct" in table and table.count("\n") >= 3
    page.screenshot(path=str(screenshot_dir() / "demo-evaluate.png"), full_page=True)
    page.close()
