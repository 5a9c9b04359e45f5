"""ehr: a FHIR R4 Bundle (JSON) -> one condensed, chronological text record.

The bundle is parsed and validated with ``fhir.resources`` (its R4B models, which read R4
bundles). Kept: conditions, medications (requests and statements), observations with their
units, procedures and allergies, each with its date; dated facts in time order, undated
ones after. Never kept: names, identifiers, addresses, contacts, birth dates (only the
patient's administrative gender is stated).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from ..hookspecs import hookimpl
from ..sample import Provenance, Sample, TextPart
from ..spec import ModalitySpec

NAME = "ehr"
MAX_DETECT_BYTES = 64 * 1024 * 1024


def _read_json(path: Path) -> object:
    from ..errors import InvalidInputError

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{path} is not JSON ({exc}); the ehr modality reads a FHIR "
                                "R4 Bundle .json") from None


def detect(path: Path) -> int:
    """90 for a JSON file whose top-level ``resourceType`` is ``Bundle``."""
    if not path.is_file() or path.suffix.lower() not in (".json", ".fhir"):
        return 0
    if path.stat().st_size > MAX_DETECT_BYTES:
        return 0
    try:
        with open(path, "rb") as f:
            if f.read(4096).lstrip()[:1] != b"{":
                return 0
        data = json.loads(path.read_text(encoding="utf-8"))
    except Exception:
        return 0
    return 90 if isinstance(data, dict) and data.get("resourceType") == "Bundle" else 0


def _concept(cc) -> str | None:  # noqa: ANN001 - a CodeableConcept
    if cc is None:
        return None
    if getattr(cc, "text", None):
        return cc.text
    for coding in cc.coding or []:
        if coding.display:
            return coding.display
    for coding in cc.coding or []:
        if coding.code:
            return str(coding.code)
    return None


def _date(*values) -> str | None:  # noqa: ANN002
    for v in values:
        if v is None:
            continue
        start = getattr(v, "start", None)  # a Period
        v = start if start is not None else v
        if v is not None and not hasattr(v, "model_fields"):
            return (v.isoformat() if hasattr(v, "isoformat") else str(v))[:10]
    return None


def _quantity(q) -> str | None:  # noqa: ANN001
    if q is None or q.value is None:
        return None
    unit = q.unit or q.code or ""
    return f"{q.value:g} {unit}".strip() if isinstance(q.value, float) else \
        f"{q.value} {unit}".strip()


def _observation_value(obs) -> str | None:  # noqa: ANN001
    value = (_quantity(obs.valueQuantity) or _concept(obs.valueCodeableConcept)
             or obs.valueString)
    if value is None and obs.valueInteger is not None:
        value = str(obs.valueInteger)
    if value is None and obs.valueBoolean is not None:
        value = "yes" if obs.valueBoolean else "no"
    if value is None and obs.component:
        comps = [f"{_concept(c.code) or '?'} {_quantity(c.valueQuantity) or '?'}"
                 for c in obs.component]
        value = "; ".join(comps)
    return value


def _status(cc) -> str:  # noqa: ANN001
    s = _concept(cc)
    return f" ({s})" if s else ""


def _fact(res) -> tuple[str | None, str] | None:  # noqa: ANN001
    """(date or None, one line) for a clinical resource, ``None`` for anything else."""
    kind = res.get_resource_type()
    if kind == "Condition":
        return (_date(res.onsetDateTime, res.onsetPeriod, res.recordedDate),
                f"Condition: {_concept(res.code) or 'unspecified'}{_status(res.clinicalStatus)}")
    if kind in ("MedicationRequest", "MedicationStatement"):
        med = _concept(res.medicationCodeableConcept) or "unspecified medication"
        dosage = res.dosageInstruction if kind == "MedicationRequest" else res.dosage
        dose = next((d.text for d in dosage or [] if d.text), None)
        when = _date(res.authoredOn) if kind == "MedicationRequest" else \
            _date(res.effectiveDateTime, res.effectivePeriod, res.dateAsserted)
        return when, f"Medication: {med}" + (f", {dose}" if dose else "") + \
            (f" [{res.status}]" if res.status else "")
    if kind == "Observation":
        value = _observation_value(res)
        return (_date(res.effectiveDateTime, res.effectivePeriod, res.effectiveInstant,
                      res.issued),
                f"Observation: {_concept(res.code) or 'unspecified'}"
                + (f" = {value}" if value else ""))
    if kind == "Procedure":
        return (_date(res.performedDateTime, res.performedPeriod),
                f"Procedure: {_concept(res.code) or 'unspecified'}")
    if kind == "AllergyIntolerance":
        reactions = [m for r in res.reaction or [] for m in
                     (_concept(x) for x in r.manifestation or []) if m]
        return (_date(res.onsetDateTime, res.onsetPeriod, res.recordedDate),
                f"Allergy: {_concept(res.code) or 'unspecified'}"
                + (f" (reaction: {', '.join(reactions)})" if reactions else "")
                + (f" [criticality {res.criticality}]" if res.criticality else ""))
    return None


def record_text(bundle) -> tuple[str, dict[str, int], str | None]:  # noqa: ANN001
    """The condensed record, resource counts, and the patient's gender (if stated)."""
    counts: dict[str, int] = {}
    facts: list[tuple[str | None, int, str]] = []
    gender = None
    for i, entry in enumerate(bundle.entry or []):
        res = entry.resource
        if res is None:
            continue
        kind = res.get_resource_type()
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "Patient":
            gender = res.gender or gender
            continue
        fact = _fact(res)
        if fact is not None:
            facts.append((fact[0], i, fact[1]))
    facts.sort(key=lambda f: (f[0] is None, f[0] or "", f[1]))
    lines = ["Patient record (FHIR), in chronological order."]
    if gender:
        lines.append(f"Sex: {gender}.")
    for date, _, text in facts:
        lines.append(f"{date or 'undated'}: {text}")
    if not facts:
        lines.append("No conditions, medications, observations, procedures or allergies.")
    return "\n".join(lines), counts, gender


def load(path: Path, options: Mapping[str, str]) -> list[Sample]:
    """Parse, validate and condense one FHIR R4 Bundle into a one-text-part sample."""
    from fhir.resources.R4B.bundle import Bundle
    from pydantic import ValidationError

    from ..errors import InvalidInputError

    if not path.is_file():
        raise InvalidInputError(f"{path} is not a file; the ehr modality reads one FHIR "
                                "Bundle .json")
    data = _read_json(path)
    if not isinstance(data, dict) or data.get("resourceType") != "Bundle":
        kind = data.get("resourceType") if isinstance(data, dict) else type(data).__name__
        raise InvalidInputError(f"{path} is not a FHIR Bundle (resourceType {kind!r}); the "
                                "ehr modality reads a FHIR R4 Bundle .json")
    try:
        bundle = Bundle.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]  # location and message only: never the (patient) values
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidInputError(f"{path} is not a valid FHIR R4 Bundle: {where}: "
                                f"{first.get('msg', 'invalid')} ({exc.error_count()} errors)") \
            from None
    except (KeyError, TypeError):  # fhir.resources looks an entry's resourceType up by name
        raise InvalidInputError(f"{path} is not a valid FHIR R4 Bundle: an entry's "
                                "resourceType is not an R4 resource type") from None
    text, counts, gender = record_text(bundle)
    meta: dict[str, object] = {"modality": NAME, "resource_counts": counts}
    if gender:
        meta["gender"] = gender
    return [Sample((TextPart(text),), NAME, Provenance(str(path)), meta)]


@hookimpl
def medgemma_register_modalities(register) -> None:  # noqa: ANN001
    register(ModalitySpec(
        name=NAME,
        description="FHIR R4 Bundle JSON -> a condensed chronological text record "
                    "(conditions, medications, observations, procedures, allergies)",
        claims=("*.json (FHIR Bundle)",),
        detect=detect,
        load=load,
    ))
