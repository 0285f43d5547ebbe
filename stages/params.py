"""The one typed schema of params.yaml, validated at load so a typo fails loudly with the key's name.

`dvc exp run -S section.key=value` adds unknown keys silently; every stage depends on its whole
section, so such a key re-runs the stage and `load_params` rejects it here, naming it.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from stages.common import WardrobeError

PARAMS_FILE = Path("params.yaml")
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

Check = tuple[Callable[[Any], bool], str]


def _rule(check: Callable[[Any], bool], text: str) -> dict[str, Check]:
    """Field metadata: a range check and the message that names what is allowed."""
    return {"check": (check, text)}


POSITIVE = _rule(lambda v: v > 0, "must be > 0")
NON_NEGATIVE = _rule(lambda v: v >= 0, "must be >= 0")
FRACTION = _rule(lambda v: 0 < v < 1, "must be in (0, 1)")
PROBABILITY = _rule(lambda v: 0 <= v < 1, "must be in [0, 1)")
NON_EMPTY = _rule(lambda v: len(v) > 0, "must not be empty")
POSITIVE_INTS = _rule(lambda v: len(v) > 0 and all(f > 0 for f in v), "must be positive ints")


@dataclass(frozen=True)
class PrepareParams:
    # Ordered: local directories (holding NAME.gz or NAME), then https:// mirrors (NAME.gz).
    sources: tuple[str, ...] = field(metadata=NON_EMPTY)
    # SHA-256 of each *decompressed* IDX file; recompressed .gz copies still verify.
    sha256: dict[str, str] = field(
        metadata=_rule(
            lambda v: sorted(v) == sorted(IDX_FILES) and all(len(h) == 64 for h in v.values()),
            f"must map exactly {', '.join(IDX_FILES)} to 64-hex-digit hashes",
        )
    )
    val_fraction: float = field(metadata=FRACTION)
    seed: int = field(metadata=NON_NEGATIVE)
    download_timeout_s: float = field(metadata=POSITIVE)
    max_download_mb: float = field(metadata=POSITIVE)


@dataclass(frozen=True)
class TrainParams:
    arch: Literal["mlp", "cnn"]
    # cnn only: one block per entry, each convs_per_block[i] × (3×3 conv of filters[i], BN, ReLU)
    # then 2×2 max-pool. Extra convs are cheapest in the later, smaller blocks.
    filters: tuple[int, ...] = field(metadata=POSITIVE_INTS)
    convs_per_block: tuple[int, ...] = field(metadata=POSITIVE_INTS)
    dense_units: int = field(metadata=POSITIVE)
    dropout: float = field(metadata=PROBABILITY)
    epochs: int = field(metadata=POSITIVE)
    batch_size: int = field(metadata=POSITIVE)
    optimizer: Literal["adam", "adamw"]
    learning_rate: float = field(metadata=POSITIVE)
    weight_decay: float = field(metadata=NON_NEGATIVE)
    # cosine: linear warm-up over warmup_epochs, then cosine decay to 0 by the last epoch.
    lr_schedule: Literal["constant", "cosine"]
    warmup_epochs: float = field(metadata=NON_NEGATIVE)
    label_smoothing: float = field(metadata=PROBABILITY)
    # 0 turns early stopping off; otherwise stop after this many epochs without val_accuracy gain
    # and restore the best weights.
    early_stopping_patience: int = field(metadata=NON_NEGATIVE)
    augment_flip: bool
    augment_shift: int = field(metadata=_rule(lambda v: 0 <= v <= 8, "must be in 0..8 pixels"))
    augment_erase: float = field(metadata=PROBABILITY)
    # mixed_bfloat16 computes in bfloat16 (weights stay float32): ~1.75x faster on CPUs with
    # AVX512_BF16/AMX, much slower without. auto picks it only where the CPU has those.
    precision: Literal["float32", "mixed_bfloat16", "auto"]
    # auto: MirroredStrategy when several GPUs are visible, else one device; mirrored: always
    # MirroredStrategy; multi_worker: MultiWorkerMirroredStrategy over the hosts in TF_CONFIG.
    # batch_size is per replica; the learning rate scales with replicas.
    strategy: Literal["auto", "mirrored", "multi_worker"]
    seed: int = field(metadata=NON_NEGATIVE)

    def __post_init__(self) -> None:
        if len(self.convs_per_block) != len(self.filters):
            raise WardrobeError(
                f"convs_per_block: needs one entry per filters entry ({len(self.filters)}), "
                f"got {len(self.convs_per_block)}"
            )


@dataclass(frozen=True)
class EvaluateParams:
    # Average predictions over each image and its mirror. auto: only for models trained with
    # flips (it costs accuracy on the others); always / never force it.
    tta_flip: Literal["auto", "always", "never"]
    batch_size: int = field(metadata=POSITIVE)
    example_grid: int = field(metadata=_rule(lambda v: 1 <= v <= 10, "must be in 1..10"))


UNIT = _rule(lambda v: 0 <= v <= 1, "must be in [0, 1]")


@dataclass(frozen=True)
class ValidateParams:
    # Quality gates `python -m stages.validate` applies to metrics/metrics.json.
    min_accuracy: float = field(metadata=UNIT)
    min_class_f1: float = field(metadata=UNIT)
    # With --against REV: the largest allowed drop in test accuracy versus REV's metrics.
    max_drop: float = field(metadata=UNIT)


@dataclass(frozen=True)
class Params:
    prepare: PrepareParams
    train: TrainParams
    evaluate: EvaluateParams
    validate: ValidateParams
    preset: str


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; every problem is a WardrobeError naming file and key."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WardrobeError(f"{path}: cannot read params file: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise WardrobeError(f"{path}: malformed YAML: {' '.join(str(exc).split())}") from exc
    try:
        return parse_params(raw)
    except WardrobeError as exc:
        raise WardrobeError(f"{path}: {exc}") from exc


def parse_params(raw: Any) -> Params:
    """Validate a params mapping: the `train` section picks a preset and overrides its keys."""
    sections = _as_mapping(raw, "params")
    _reject_unknown(sections, {"prepare", "train", "evaluate", "validate", "presets"}, "")
    presets = _as_mapping(_required(sections, "presets", ""), "presets")
    train_raw = dict(_as_mapping(_required(sections, "train", ""), "train"))
    preset = train_raw.pop("preset", None)
    if preset not in presets:
        raise WardrobeError(f"train.preset: {preset!r} is not one of {sorted(presets)}")
    for name, values in presets.items():
        _build(TrainParams, values, f"presets.{name}")
    train_fields = {f.name for f in dataclasses.fields(TrainParams)}
    _reject_unknown(train_raw, train_fields, "train.")
    merged = {**_as_mapping(presets[preset], f"presets.{preset}"), **train_raw}
    return Params(
        prepare=_build(PrepareParams, _required(sections, "prepare", ""), "prepare"),
        train=_build(TrainParams, merged, "train"),
        evaluate=_build(EvaluateParams, _required(sections, "evaluate", ""), "evaluate"),
        validate=_build(ValidateParams, _required(sections, "validate", ""), "validate"),
        preset=preset,
    )


def _build(cls: type, raw: Any, where: str) -> Any:
    values = _as_mapping(raw, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(values, set(fields), f"{where}.")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, fld in fields.items():
        key = f"{where}.{name}"
        value = _coerce(_required(values, name, f"{where}."), hints[name], key)
        check: Check | None = fld.metadata.get("check")
        if check and not check[0](value):
            raise WardrobeError(f"{key}: {check[1]}, got {value!r}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except WardrobeError as exc:  # a check across fields, from __post_init__
        raise WardrobeError(f"{where}.{exc}") from exc


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise WardrobeError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise WardrobeError(f"{key}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        mapping = _as_mapping(value, key)
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in mapping.items()}
    # bool is an int subclass in Python: keep `epochs: true` and `flip: 1` out explicitly.
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise WardrobeError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")


def _as_mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise WardrobeError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _required(values: Mapping[str, Any], name: str, prefix: str) -> Any:
    if name not in values:
        raise WardrobeError(f"{prefix}{name}: missing key")
    return values[name]


def _reject_unknown(values: Mapping[str, Any], allowed: set[str], prefix: str) -> None:
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise WardrobeError(f"{prefix}{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")
