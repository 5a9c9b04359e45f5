"""The built-in tasks: the MedGemma report's benchmarks, registered through the same hook as
third-party tasks (plugin name ``builtin``).

| task | data | modes | headline |
|---|---|---|---|
| ``medqa`` | MedQA (USMLE), 4 options; bundled sample | loglik, generate | accuracy |
| ``medqa_5`` | MedQA (USMLE), 5 options; ``--data`` | loglik, generate | accuracy |
| ``medmcqa`` | MedMCQA, 4 options; bundled sample | loglik, generate | accuracy |
| ``pubmedqa`` | PubMedQA (yes / no / maybe as A / B / C); bundled sample | loglik, generate | accuracy |
| ``mmlu_med`` | MMLU's six medical subjects; bundled sample | loglik, generate | accuracy |
| ``afrimedqa`` | AfriMed-QA multiple choice; bundled sample | loglik, generate | accuracy |
| ``vqa_rad`` | VQA-RAD JSON + images; ``--data`` | generate | accuracy |
| ``slake`` | SLAKE JSON (English) + images; ``--data`` | generate | token F1 |
| ``cxr_labels`` | CXR manifest, 5 CheXpert labels; ``--data`` | generate, zeroshot | macro F1 / AUC |
| ``cxr_report`` | CXR manifest with reports; ``--data`` | generate | ROUGE-L |
"""

from __future__ import annotations

from pathlib import Path

from . import metrics as m
from . import prompts as p
from .hookspecs import hookimpl
from .readers import cxr_labels_reader, cxr_report_reader, mcq_reader, vqa_reader
from .spec import EvalTask, Prompt

DATA = Path(__file__).parent / "data"
#: The five CheXpert competition findings, which the report's MIMIC-CXR / CheXpert macro F1 uses.
CXR_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")

MCQ_PROMPT = Prompt(loglik=p.MCQ_LOGLIK, generate=p.MCQ_GENERATE)
MMLU_PROMPT = Prompt(loglik=p.MMLU_LOGLIK, generate=p.MMLU_GENERATE)
MCQ_METRICS = (m.ACCURACY, m.MACRO_F1, m.WEIGHTED_F1)
MCQ_HELP = "JSON lines with question, options (letter -> text) and answer_idx"


def _mcq(name: str, description: str, fixture: str | None, *, options: int | None = None,
         prompt: Prompt = MCQ_PROMPT, groups: tuple[str, ...] = ()) -> EvalTask:
    return EvalTask(
        name=name, description=description, kind="mcq", reader=mcq_reader(options),
        prompt=prompt, modes=("loglik", "generate"), metrics=MCQ_METRICS, groups=groups,
        fixture=DATA / fixture if fixture else None,
        data_help=MCQ_HELP + (f", {options} options" if options else ""), max_new_tokens=32)


def builtin_tasks() -> list[EvalTask]:
    vqa_help = ("a VQA JSON list of question / answer / image_name (answer_type OPEN / CLOSED) "
                "with the images in images/ beside it")
    cxr_help = ("JSON lines or CSV: an image path (image / path, relative to the manifest) "
                "and labels (a list, or one column per label: 1 present)")
    return [
        _mcq("medqa", "MedQA (USMLE), 4 options", "medqa_sampled_50.jsonl", options=4,
             groups=("subject",)),
        _mcq("medqa_5", "MedQA (USMLE), 5 options", None, options=5),
        _mcq("medmcqa", "MedMCQA (Indian medical entrance exams), 4 options",
             "medmcqa_sampled_50.jsonl", options=4),
        _mcq("pubmedqa", "PubMedQA: abstract + question, yes / no / maybe as A / B / C",
             "pubmedqa_sampled_50.jsonl"),
        _mcq("mmlu_med", "MMLU medical subsets (anatomy, clinical knowledge, college biology "
             "and medicine, medical genetics, professional medicine)", "mmlu_sampled_50.jsonl",
             prompt=MMLU_PROMPT, groups=("subject",)),
        _mcq("afrimedqa", "AfriMed-QA multiple choice", "afrimedqa_sampled_50.jsonl"),
        EvalTask(name="vqa_rad", description="VQA-RAD: radiology visual QA (accuracy)",
                 kind="vqa", reader=vqa_reader(""), prompt=Prompt(generate=p.VQA_GENERATE),
                 modes=("generate",), metrics=(m.ACCURACY, m.TOKEN_F1),
                 groups=("answer_type",), data_help=vqa_help, max_new_tokens=16),
        EvalTask(name="slake", description="SLAKE (English): radiology visual QA (token F1)",
                 kind="vqa", reader=vqa_reader("en"), prompt=Prompt(generate=p.VQA_GENERATE),
                 modes=("generate",), metrics=(m.TOKEN_F1, m.ACCURACY),
                 groups=("answer_type",), data_help=vqa_help, max_new_tokens=16),
        EvalTask(name="cxr_labels",
                 description="chest X-ray multi-label classification (5 CheXpert findings)",
                 kind="multilabel", reader=cxr_labels_reader(CXR_LABELS),
                 prompt=Prompt(generate=p.CXR_LABELS_GENERATE, zeroshot=p.CXR_ZEROSHOT),
                 modes=("generate", "zeroshot"),
                 metrics=(m.multilabel_f1(CXR_LABELS), m.multilabel_f1(CXR_LABELS, "weighted"),
                          m.ACCURACY),
                 metrics_by_mode={"zeroshot": (m.macro_auc(CXR_LABELS),
                                               m.multilabel_f1(CXR_LABELS))},
                 data_help=cxr_help, labels=CXR_LABELS, max_new_tokens=48),
        EvalTask(name="cxr_report", description="chest X-ray report generation (findings)",
                 kind="report", reader=cxr_report_reader(),
                 prompt=Prompt(generate=p.CXR_REPORT_GENERATE), modes=("generate",),
                 metrics=(m.ROUGE_L, m.BLEU, m.RADGRAPH_F1),
                 data_help="JSON lines or CSV: an image path and its report text",
                 max_new_tokens=256),
    ]


@hookimpl
def medgemma_eval_tasks(register) -> None:  # noqa: ANN001
    for task in builtin_tasks():
        register(task)
