"""Task presets: the tasks the MedGemma technical report evaluates, as ready prompts.

Each preset fills the system prompt and the question box; the user attaches the matching file
(a chest X-ray, a CT series, a slide, a skin photograph, a FHIR bundle) in the upload box.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """A named task: ``system`` prompt, ``prompt`` text, and the input it expects (``expects``)."""

    name: str
    system: str
    prompt: str
    expects: str


PRESETS: tuple[Preset, ...] = (
    Preset("Chest X-ray report",
           "You are an expert radiologist.",
           "Describe this chest X-ray and write a radiology report with findings and an "
           "impression.",
           "a chest radiograph (DICOM, PNG or JPEG)"),
    Preset("Visual question (VQA)",
           "You are an expert radiologist. Answer briefly.",
           "Is there a pneumothorax in this image? Answer yes or no, then explain.",
           "a radiology image (VQA-RAD / SLAKE style)"),
    Preset("CT series report",
           "You are an instructor teaching medical residents. You are given axial CT slices "
           "in order, each followed by its slice number.",
           "Write a radiology report for this CT series: findings, then impression.",
           "a zipped CT series (folder of DICOM slices)"),
    Preset("Dermatology",
           "You are an expert dermatologist.",
           "Describe this skin lesion and give the most likely diagnosis with a short "
           "differential.",
           "a photograph of the skin (JPEG or PNG)"),
    Preset("Pathology patches",
           "You are an expert pathologist.",
           "These are tissue patches from one whole-slide image. Which tissue types do you "
           "see, and is there tumour?",
           "a whole-slide image (SVS, TIFF, DICOM WSI)"),
    Preset("Question about an EHR",
           "You are a clinical assistant answering questions about one patient's health "
           "record. Use only the record.",
           "Which medications is the patient currently taking, and for which conditions?",
           "a FHIR R4 bundle (JSON)"),
    Preset("Medical exam question",
           "You are a medical expert. Answer with the letter of the correct option, then "
           "explain briefly.",
           "A 45-year-old man has crushing chest pain radiating to the left arm. Which test "
           "comes first? (A) Troponin (B) ECG (C) Chest X-ray (D) D-dimer",
           "nothing (or a MedQA-style .jsonl)"),
)


def preset(name: str) -> Preset:
    """The preset called ``name``; ``KeyError`` naming the choices otherwise."""
    for p in PRESETS:
        if p.name == name:
            return p
    raise KeyError(f"no preset {name!r}; choose one of: {', '.join(p.name for p in PRESETS)}")
