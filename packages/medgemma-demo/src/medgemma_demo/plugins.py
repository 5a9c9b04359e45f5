"""The Plugins tab: the installed modality plugins, their versions, and broken ones."""

from __future__ import annotations

import pandas as pd

import medgemma_data

COLUMNS = ["modality", "version", "distribution", "reads", "description"]


def plugin_table() -> pd.DataFrame:
    """One row per registered modality (``medgemma_data.list_plugins()``)."""
    rows = [[p.name, p.version, p.distribution, "; ".join(p.claims), p.description]
            for p in medgemma_data.list_plugins()]
    return pd.DataFrame(rows, columns=COLUMNS)


def problems_markdown() -> str:
    """Plugins that failed to load or clash, as markdown (empty when none)."""
    problems = medgemma_data.plugin_problems()
    if not problems:
        return ""
    lines = ["**Plugins that did not load:**"]
    lines += [f"- `{p.plugin}` ({p.distribution}): {p.message}" for p in problems]
    return "\n".join(lines)
