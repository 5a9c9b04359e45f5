"""Run configuration: frozen dataclasses, loaded from YAML with dotted overrides.

::

    cfg = load_config("run.yaml", overrides=["optimizer.lr=1e-4", "run.max_steps=200"])
    cfg.optimizer.lr          # 0.0001
    to_dict(cfg)              # plain dicts, what run/config.yaml holds

An unknown key anywhere is a :class:`ConfigError` naming the nearest valid key
(``optimizer.lrr`` -> "did you mean optimizer.lr?"); a value of the wrong type names the key
and the type it wants. Override values are parsed as YAML scalars (``1e-4``, ``true``,
``[hf, peft]``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "DataConfig", "LoRASettings", "ModelConfig", "OptimizerConfig",
           "RunConfig", "RunSettings", "SourceConfig", "TrainableConfig", "apply_overrides",
           "config_from_dict", "from_dict", "load_config", "to_dict"]


class ConfigError(ValueError):
    """A bad configuration key or value (one line)."""


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One named data source. ``kind``: ``chat`` (JSONL of ``{"messages": [...]}``),
    ``manifest`` (JSONL/CSV of ``path, question, answer[, split]``, the files read by a
    medgemma-data plugin), ``qa`` (a QA set medgemma-data parses: its label is the answer) or
    ``auto`` (from the file). ``weight``: share in the mixture; ``split``: keep only manifest
    rows of this split; ``modality`` / ``options``: passed to ``medgemma_data.load``."""

    path: str = ""
    name: str = ""
    kind: str = "auto"
    weight: float = 1.0
    split: str = ""
    modality: str = ""
    options: dict = dataclasses.field(default_factory=dict)
    question: str = ""  # manifest rows without a question use this one


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """``checkpoint``: anything ``medgemma_core`` loads (HF folder, GGUF, Orbax folder).
    ``dtype``: parameter (master) dtype; ``compute_dtype``: forward/backward dtype ("" = the
    parameters'); ``remat``: ``none``, ``full`` or ``dots``; ``loss_chunk``: tokens projected
    onto the vocabulary at a time."""

    checkpoint: str = ""
    dtype: str = "float32"
    compute_dtype: str = ""
    remat: str = "none"
    loss_chunk: int = 512


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``batch_size``: rows per optimizer step over all devices and processes (before
    accumulation: a step sees ``batch_size * optimizer.grad_accum`` rows). ``seq_len``: every
    row is padded (or cut) to it. ``image_slots``: images per row (0 = the most any row holds).
    ``mask_prompt``: loss on the answers only (the notebook recipe trains on every token except
    padding and image tokens). ``pack``: several text-only rows per ``seq_len`` sequence
    (:mod:`~medgemma_train.engine.packing`; a step then takes ``batch_size`` sequences)."""

    train: tuple[SourceConfig, ...] = ()
    eval: tuple[SourceConfig, ...] = ()
    batch_size: int = 16
    seq_len: int = 512
    image_slots: int = 0
    mask_prompt: bool = False
    skip_bad: bool = False
    seed: int = 0
    system: str = ""
    pack: bool = False


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """``name``: ``adamw`` or ``adafactor``; ``decay``: ``linear``, ``cosine`` or ``constant``
    after ``warmup_ratio`` of the steps (or ``warmup_steps`` when > 0)."""

    name: str = "adamw"
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    warmup_steps: int = 0
    decay: str = "linear"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 0.3
    grad_accum: int = 1


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """``rank`` 0 = full fine-tuning (no adapters)."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    targets: str = ""  # "" = medsiglip.lora.DEFAULT_TARGETS (every linear projection)


@dataclasses.dataclass(frozen=True)
class TrainableConfig:
    """What trains, per part: ``lora``, ``full``, ``frozen`` or ``auto`` (LoRA runs: decoder
    and vision LoRA, as PEFT's all-linear; full runs: everything)."""

    decoder: str = "auto"
    vision: str = "auto"
    projector: str = "auto"


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """``max_steps`` 0 = ``epochs`` over the training rows. ``save_every``/``eval_every``
    0 = never (a final checkpoint is always saved). ``keep_last`` + ``keep_best`` checkpoints
    survive (best by ``best_metric``, ``min`` or ``max``). ``mesh``: ``data=2,fsdp=2,tensor=2``
    style, -1 = the rest of the devices. ``export``: ``hf`` and/or ``peft`` at the end."""

    out: str = "run"
    max_steps: int = 0
    epochs: float = 1.0
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0
    eval_on_start: bool = False  # also validate before the first step (the baseline)
    save_every: int = 100
    keep_last: int = 2
    keep_best: int = 1
    best_metric: str = "eval_loss"
    best_mode: str = "min"
    mesh: str = "data=-1"
    resume: bool = False
    stop_at: int = 0  # stop after this step with a checkpoint, as if preempted (0 = never)
    export: tuple[str, ...] = ()
    tensorboard: bool = True
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class RunConfig:
    stage: str = "sft"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    lora: LoRASettings = LoRASettings()
    trainable: TrainableConfig = TrainableConfig()
    run: RunSettings = RunSettings()
    #: the stage's own settings (an instance of its ``StageSpec.settings`` dataclass), read
    #: from the section named after the stage (``siglip: {resolution: 448}``,
    #: ``--set siglip.resolution=448``); None for a stage without settings.
    options: Any = None

    def __post_init__(self) -> None:
        validate(self)


_CHOICES = {
    ("model", "remat"): ("none", "full", "dots"),
    ("model", "dtype"): ("float32", "bfloat16"),
    ("model", "compute_dtype"): ("", "float32", "bfloat16"),
    ("optimizer", "name"): ("adamw", "adafactor"),
    ("optimizer", "decay"): ("linear", "cosine", "constant"),
    ("trainable", "decoder"): ("auto", "lora", "full", "frozen"),
    ("trainable", "vision"): ("auto", "lora", "full", "frozen"),
    ("trainable", "projector"): ("auto", "lora", "full", "frozen"),
    ("run", "best_mode"): ("min", "max"),
}
_POSITIVE = {("data", "batch_size"), ("data", "seq_len"), ("optimizer", "grad_accum"),
             ("model", "loss_chunk"), ("run", "log_every")}


def validate(cfg: RunConfig) -> None:
    for (section, key), allowed in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key}={value!r}: choose one of "
                              f"{', '.join(repr(a) for a in allowed)}")
    for section, key in _POSITIVE:
        if getattr(getattr(cfg, section), key) < 1:
            raise ConfigError(f"{section}.{key} must be at least 1")
    for name in cfg.run.export:
        if name not in ("hf", "peft"):
            raise ConfigError(f"run.export={list(cfg.run.export)}: each is 'hf' or 'peft'")
    if cfg.lora.rank < 0:
        raise ConfigError("lora.rank must be 0 (full fine-tuning) or positive")
    if not 0.0 <= cfg.optimizer.warmup_ratio < 1.0:
        raise ConfigError("optimizer.warmup_ratio must be in [0, 1)")
    if cfg.optimizer.lr <= 0:
        raise ConfigError("optimizer.lr must be positive")
    names = [s.name for s in (*cfg.data.train, *cfg.data.eval)]
    dup = sorted({n for n in names if n and names.count(n) > 1})
    if dup:
        raise ConfigError(f"data source name {dup[0]!r} is used twice; give each a new name")


# ---- dict <-> dataclass -------------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        t = _hints(cls)[f.name]
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(t):
            out += _keys(t, f"{prefix}{f.name}.")
        elif typing.get_origin(t) is tuple and dataclasses.is_dataclass(typing.get_args(t)[0]):
            out += _keys(typing.get_args(t)[0], f"{prefix}{f.name}[].")
    return out


def _nearest(key: str, cls: type, where: str) -> str:
    top = where.split(".", 1)[0]
    if where and top not in {f.name for f in dataclasses.fields(RunConfig)}:
        valid = [where + k.replace("[].", ".") for k in _keys(cls)]  # a stage's own section
    else:
        valid = [k.replace("[].", ".") for k in _keys(RunConfig)]
    full = f"{where}{key}"
    near = difflib.get_close_matches(full, valid, n=1, cutoff=0.5)
    if not near:
        here = [f.name for f in dataclasses.fields(cls)]
        near = [f"{where}{n}" for n in difflib.get_close_matches(key, here, n=1, cutoff=0.3)]
    hint = f"; did you mean {near[0]}?" if near else ""
    return f"unknown config key {full!r}{hint}"


def _coerce(value: Any, t: Any, where: str) -> Any:
    origin = typing.get_origin(t)
    if dataclasses.is_dataclass(t):
        if isinstance(value, t):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where.rstrip('.')}: expected a mapping of settings, got "
                              f"{value!r:.60}")
        return from_dict(t, value, where)
    if origin is tuple:
        (inner, *_rest) = typing.get_args(t)
        if isinstance(value, str | Mapping) or not isinstance(value, Iterable):
            value = [value]
        return tuple(_coerce(v, inner, f"{where}[{i}].") for i, v in enumerate(value))
    if origin in (types.UnionType, typing.Union):
        return value
    key = where.rstrip(".")
    if t is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if t is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r}: expected a number")
    if t is str:
        if value is None:
            return ""
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected a string")
    if t is dict:
        if isinstance(value, Mapping):
            return {str(k): str(v) for k, v in value.items()}
        raise ConfigError(f"{key}: expected a mapping")
    return value


def from_dict(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    """``cls`` (a config dataclass) from nested mappings; unknown keys are errors."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'the config'}: expected a mapping, got {data!r:.60}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        key = str(key)
        if key not in names:
            raise ConfigError(_nearest(key, cls, where))
        kwargs[key] = _coerce(value, hints[key], f"{where}{key}.")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where.rstrip('.') or 'config'}: {exc}") from None


def to_dict(cfg: Any) -> Any:
    """Plain dicts/lists of a config (what ``config.yaml`` of a run holds). A
    :class:`RunConfig`'s stage settings go under the stage's name, as they are written."""
    if isinstance(cfg, RunConfig):
        out = {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
               if f.name != "options"}
        if cfg.options is not None:
            out[cfg.stage] = to_dict(cfg.options)
        return out
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple | list):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """``["optimizer.lr=1e-4", "data.train.0.weight=2"]`` applied to nested dicts (a new
    copy). A list index may appear as a number (``data.train.0.path``)."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. optimizer.lr=1e-4")
        parts = key.split(".")
        node: Any = out
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(node, list):
                node = _index(node, part, key)
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is not a section")
            if part not in node or node[part] is None:
                node[part] = [] if nxt.isdigit() else {}
            node = node[part]
        last = parts[-1]
        value = _parse_value(raw)
        if isinstance(node, list):
            idx = int(last) if last.isdigit() else -1
            if not 0 <= idx <= len(node):
                raise ConfigError(f"--set {key}: index {last} out of range")
            if idx == len(node):
                node.append(value)
            else:
                node[idx] = value
        else:
            node[last] = value
    return out


def _index(node: list, part: str, key: str) -> Any:
    if not part.isdigit():
        raise ConfigError(f"--set {key}: {part!r} must be a list index (0, 1, ...)")
    idx = int(part)
    if idx == len(node):
        node.append({})
    if idx > len(node):
        raise ConfigError(f"--set {key}: index {idx} out of range (the list has {len(node)})")
    return node[idx]


def load_config(path: str | Path | None = None, *, overrides: Iterable[str] = (),
                base: Mapping[str, Any] | None = None,
                flags: Mapping[str, Any] | None = None,
                settings: type | None = None) -> RunConfig:
    """``base`` (nested dicts: a stage's defaults), then the YAML file at ``path``
    (optional), then ``flags`` (nested dicts from command-line flags), then the dotted
    ``overrides`` (``--set``), as a validated :class:`RunConfig`.

    ``settings``: the stage's settings dataclass (``StageSpec.settings``); its values come
    from the section named after the stage and land in ``RunConfig.options``. Without it,
    such a section is an unknown key."""
    import yaml

    data: dict[str, Any] = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found; pass an existing YAML file")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            at = f" at line {line + 1}" if line is not None else ""
            raise ConfigError(f"{p}: not valid YAML{at}; fix the file") from None
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        data = _merge(data, loaded)
    data = _sources_from_strings(_merge(data, flags or {}))
    data = apply_overrides(data, overrides)
    data = _sources_from_strings(data)
    return config_from_dict(data, settings)


def config_from_dict(data: Mapping[str, Any], settings: type | None = None) -> RunConfig:
    """A :class:`RunConfig` from nested dicts (``config.yaml`` of a run): the section named
    after the stage becomes ``options``, an instance of ``settings``."""
    data = dict(data)
    stage = str(data.get("stage") or RunConfig.stage)
    if "options" in data:
        raise ConfigError(f"unknown config key 'options'; a stage's settings go in the "
                          f"section named after it ({stage}:)")
    if settings is not None:
        if not (isinstance(settings, type) and dataclasses.is_dataclass(settings)):
            raise TypeError(f"stage {stage}: settings must be a dataclass, got {settings!r}")
        section = data.pop(stage, None) or {}
        data["options"] = from_dict(settings, section, f"{stage}.")
    return from_dict(RunConfig, data)


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k),
                                                                            Mapping) else v
    return out


def _sources_from_strings(data: dict[str, Any]) -> dict[str, Any]:
    """``data.train: file.jsonl`` (or a list of paths) is short for ``[{path: file.jsonl}]``."""
    section = data.get("data")
    if not isinstance(section, Mapping):
        return data
    section = dict(section)
    for key in ("train", "eval"):
        value = section.get(key)
        if value is None:
            continue
        items = [value] if isinstance(value, str | Mapping) else list(value)
        section[key] = [{"path": v} if isinstance(v, str) else v for v in items]
    return {**data, "data": section}
