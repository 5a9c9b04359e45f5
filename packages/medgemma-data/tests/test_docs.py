"""The plugin guide documents every hook (with its exact parameters) and every record field."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import medgemma_data
from medgemma_data import hookspecs
from medgemma_data.manager import ENTRY_POINT_GROUP, ENV_ALLOW, ENV_DENY, ENV_TRACE

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
README = Path(__file__).resolve().parents[1] / "README.md"


def hooks() -> dict[str, inspect.Signature]:
    found = {}
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("medgemma_"):
            assert getattr(fn, "medgemma_spec", None) is not None, f"{name} is not a hookspec"
            found[name] = inspect.signature(fn)
    return found


def test_every_hook_has_a_heading_with_its_signature():
    text = DOCS.read_text()
    headings = re.findall(r"^### `(medgemma_\w+)\(([^)]*)\)`\s*$", text, flags=re.M)
    documented = {name: [a.strip() for a in args.split(",") if a.strip()]
                  for name, args in headings}
    assert hooks(), "no hookspecs found"
    for name, sig in hooks().items():
        assert name in documented, f"hook {name} is not documented in {DOCS.name}"
        assert documented[name] == list(sig.parameters), f"{name}: signature differs"
    assert set(documented) <= set(hooks()), "the guide documents a hook that does not exist"


def test_hookspecs_are_typed_and_keyword_documented():
    for name, sig in hooks().items():
        fn = getattr(hookspecs, name)
        assert fn.__doc__ and "Example::" in fn.__doc__, f"{name} needs a worked example"
        for param in sig.parameters.values():
            assert param.annotation is not inspect.Parameter.empty, f"{name}.{param.name}"


def test_records_and_environment_are_documented():
    text = DOCS.read_text()
    for field in dataclasses.fields(medgemma_data.ModalitySpec):
        assert f"| `{field.name}` |" in text, f"ModalitySpec.{field.name} undocumented"
    for var in (ENV_ALLOW, ENV_DENY, ENV_TRACE, ENTRY_POINT_GROUP):
        assert var in text


def test_readme_documents_the_public_api():
    text = README.read_text()
    for name in ("load(", "detect(", "list_plugins(", "Sample", ".parts", ".provenance",
                 ".metadata", "medgemma-data convert", "medgemma-data inspect",
                 "medgemma-data plugins"):
        assert name in text, f"README lacks {name}"
