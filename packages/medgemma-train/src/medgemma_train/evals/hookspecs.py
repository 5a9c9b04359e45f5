"""The hook an evaluation-task plugin implements.

Plugins are found through the entry-point group ``medgemma.eval_tasks``; the entry point names
a light module holding ``@hookimpl`` functions. Hooks are called with keywords only.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from .spec import EvalTask

PROJECT = "medgemma"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def medgemma_eval_tasks(register: Callable[[EvalTask], None]) -> None:
    """Register the evaluation tasks this plugin adds by calling ``register(EvalTask(...))``.

    Called once per process, when the harness first needs its task list. Keep it cheap: read
    data inside the reader, not at import.

    Example::

        from medgemma_train.evals import EvalTask, Prompt, hookimpl, metrics, readers

        @hookimpl
        def medgemma_eval_tasks(register):
            register(EvalTask(
                name="headqa",
                description="HEAD-QA (Spanish healthcare exams), 4-5 options",
                kind="mcq",
                reader=readers.mcq_reader(),            # question / options / answer_idx JSONL
                prompt=Prompt(loglik="Question: {question}\\n{options}\\nAnswer:",
                              generate="{question}\\n{options}\\nReply with the letter."),
                modes=("loglik", "generate"),
                metrics=(metrics.ACCURACY, metrics.MACRO_F1),
            ))
    """
