"""Task plugins: the built-ins through the hook, a third-party task, conflicts and breakage."""

from __future__ import annotations

import dataclasses
import types

import pytest

from medgemma_train.evals import EvalError, EvalTask, Prompt, hookimpl, metrics, readers
from medgemma_train.evals.registry import build_registry, get_registry, set_registry

BUILTINS = {"medqa", "medqa_5", "medmcqa", "pubmedqa", "mmlu_med", "afrimedqa", "vqa_rad",
            "slake", "cxr_labels", "cxr_report"}


def _plugin(*tasks: EvalTask, fail: bool = False) -> types.ModuleType:
    mod = types.ModuleType("thirdparty")

    @hookimpl
    def medgemma_eval_tasks(register):
        if fail:
            raise RuntimeError("boom")
        for t in tasks:
            register(t)

    mod.medgemma_eval_tasks = medgemma_eval_tasks
    return mod


HEADQA = EvalTask(name="headqa", description="HEAD-QA", kind="mcq",
                  reader=readers.mcq_reader(), prompt=Prompt(loglik="Q: {question}\n{options}\nA:",
                                                             generate="{question}\n{options}"),
                  modes=("loglik", "generate"), metrics=(metrics.ACCURACY,))


def test_builtins_register_through_the_hook():
    reg = build_registry()
    assert set(reg.tasks) == BUILTINS and not reg.problems
    info = reg.tasks["medqa"]
    assert (info.plugin, info.distribution) == ("builtin", "medgemma-train")
    assert reg.pm.has_plugin("builtin")  # the same manager third-party plugins go through


def test_third_party_task_and_conflicts():
    reg = build_registry(extra=[("headqa-plugin", _plugin(HEADQA), "medgemma-headqa", "1.2")])
    assert reg.get("headqa") is HEADQA and reg.tasks["headqa"].version == "1.2"
    clash = dataclasses.replace(HEADQA, name="medqa")
    reg = build_registry(extra=[("clash", _plugin(clash), "medgemma-clash", "0.1")])
    with pytest.raises(EvalError, match="medgemma-train .* and medgemma-clash 0.1"):
        reg.get("medqa")


def test_broken_plugins_are_reported_not_fatal():
    typo = types.ModuleType("typo")

    @hookimpl
    def medgemma_eval_task(register):  # misspelled hook
        pass

    typo.medgemma_eval_task = medgemma_eval_task
    reg = build_registry(extra=[("boom", _plugin(fail=True), "d1", "1"),
                                ("typo", typo, "d2", "1")])
    assert set(reg.tasks) == BUILTINS
    problems = {p.plugin: p.problem for p in reg.problems}
    assert "boom" in problems["boom"] and "failed to load" in problems["typo"]


def test_allow_and_deny_lists(monkeypatch):
    monkeypatch.setenv("MEDGEMMA_EVAL_DISABLE_PLUGINS", "builtin")
    assert build_registry().tasks == {}
    monkeypatch.delenv("MEDGEMMA_EVAL_DISABLE_PLUGINS")
    monkeypatch.setenv("MEDGEMMA_EVAL_PLUGINS", "x")
    assert build_registry().tasks == {}


def test_unknown_task_names_the_known_ones():
    previous = set_registry(None)
    try:
        with pytest.raises(EvalError, match="unknown task 'medqaa'.*medqa, medqa_5"):
            get_registry().get("medqaa")
    finally:
        set_registry(previous)


@pytest.mark.parametrize(("change", "match"), [
    ({"name": "Bad Name"}, "lower-case"),
    ({"kind": "essay"}, "kind"),
    ({"modes": ("loglik", "vibes")}, "modes"),
    ({"metrics": ()}, "at least one metric"),
    ({"prompt": Prompt(generate="x")}, "loglik scoring needs"),
    ({"modes": ("zeroshot",)}, "zeroshot scoring needs"),
])
def test_task_records_are_checked(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(HEADQA, **change)
