"""The one typed schema of params.yaml, validated at load so a typo fails loudly with the key's name.

params.yaml is composed from conf/ by DVC's Hydra integration at every `dvc exp run` (`compose`
below does the same for `make params` and for validate's check that the two agree), so it holds
the complete, resolved recipe: every key is there for `-S train.KEY=VALUE`, and `dvc params diff`
shows each key a recipe switch (`-S train=long`) changed. Each stage depends on its whole section,
so a key added by hand re-runs the stage and `load_section` rejects it here, naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from wardrobe.common import WardrobeError

PARAMS_FILE = Path("params.yaml")
CONF_DIR = Path("conf")
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


IMAGE_SIZE = _rule(lambda v: len(v) == 2 and min(v) >= 8, "must be [height, width], each >= 8")
CHANNELS = _rule(lambda v: v in (1, 3), "must be 1 or 3")
# The sets of a dataset: `train` (validation is split from it) and `test` (held out).
DATA_SETS = ("train", "test")
# A folder dataset's pictures live below this folder, which dvc.yaml names as a dependency of
# prepare: a picture added, changed or removed there makes `dvc status` name prepare. (DVC cannot
# take a dependency's path from a param that only some datasets have, and a folder outside the
# repository could not be pushed with `dvc push` anyway.)
PICTURES_DIR = Path("data/pictures")


@dataclass(frozen=True, kw_only=True)
class DataParams:
    """The dataset (conf/data/NAME.yaml): what prepare reads and records; no stage names one."""

    name: str = field(metadata=NON_EMPTY)
    description: str
    # idx: MNIST-format files, verified by hash; folder: one sub-folder of pictures per class.
    format: Literal["idx", "folder"]
    # idx only: each set's IDX files, images then labels.
    files: dict[str, tuple[str, ...]] | None = field(default=None, metadata={"format": "idx"})
    # idx only. Ordered: local directories (holding NAME.gz or NAME), then https:// mirrors (NAME.gz).
    sources: tuple[str, ...] | None = field(default=None, metadata={**NON_EMPTY, "format": "idx"})
    # idx only: SHA-256 of each *decompressed* IDX file; recompressed .gz copies still verify.
    sha256: dict[str, str] | None = field(default=None, metadata={"format": "idx"})
    # idx only: label i is class_names[i] (a folder's classes are its sub-folders, sorted).
    class_names: tuple[str, ...] | None = field(default=None, metadata={"format": "idx"})
    # folder only: the training pictures, ROOT/CLASS/*.png|jpg|jpeg|bmp|gif; validation is split from them.
    root: str | None = field(default=None, metadata={**NON_EMPTY, "format": "folder"})
    # folder only: test pictures in the same layout; "" splits test_fraction off root instead.
    test_root: str | None = field(default=None, metadata={"format": "folder"})
    test_fraction: float | None = field(default=None, metadata={**FRACTION, "format": "folder"})
    # folder only: every picture is resized to height × width, in grayscale (1) or RGB (3).
    image_size: tuple[int, ...] | None = field(default=None, metadata={**IMAGE_SIZE, "format": "folder"})
    channels: int | None = field(default=None, metadata={**CHANNELS, "format": "folder"})
    # wardrobe predict: object = invert a light background and crop to the object; resize = plain.
    photo_fit: Literal["object", "resize"]

    def __post_init__(self) -> None:
        if self.format != "idx":
            return
        assert self.files is not None and self.sha256 is not None and self.class_names is not None, "the schema"
        if sorted(self.files) != sorted(DATA_SETS) or any(len(pair) != 2 for pair in self.files.values()):
            raise WardrobeError(f"files: must map {' and '.join(DATA_SETS)} each to [images file, labels file]")
        names = self.file_names()
        if sorted(self.sha256) != sorted(names) or not all(len(h) == 64 for h in self.sha256.values()):
            raise WardrobeError(f"sha256: must map exactly {', '.join(names)} to 64-hex-digit hashes")
        if len(self.class_names) < 2 or len(set(self.class_names)) != len(self.class_names):
            raise WardrobeError(f"class_names: needs at least two distinct names, got {list(self.class_names)}")
        if any(not name.strip() for name in self.class_names):
            raise WardrobeError("class_names: a name is empty")

    def file_names(self) -> tuple[str, ...]:
        return tuple(name for data_set in DATA_SETS for name in (self.files or {}).get(data_set, ()))


def untracked_folders(data: DataParams) -> list[str]:
    """A problem line per folder of a folder dataset that is not below PICTURES_DIR (prepare
    refuses to run then: DVC would not see its pictures change). The library functions read any
    folder; only the stage, which DVC runs for this dependency, needs the rule."""
    problems = []
    for key in ("root", "test_root"):
        folder = getattr(data, key)
        relative = Path(folder or "")
        if folder and (relative.is_absolute() or ".." in relative.parts or relative.parts[:2] != PICTURES_DIR.parts):
            problems.append(
                f"data.{key}: {folder} is not below {PICTURES_DIR}/, the folder DVC tracks for prepare; "
                f"move or `dvc add` the pictures into {PICTURES_DIR}/NAME and set {key}: {PICTURES_DIR}/NAME"
            )
    return problems


@dataclass(frozen=True)
class PrepareParams:
    val_fraction: float = field(metadata=FRACTION)
    seed: int = field(metadata=NON_NEGATIVE)
    download_timeout_s: float = field(metadata=POSITIVE)
    max_download_mb: float = field(metadata=POSITIVE)
    # Processes that decode a folder's pictures; 0 = one per core this process may use. The arrays
    # are the same bytes whatever the number (each picture's place is fixed before decoding).
    workers: int = field(metadata=NON_NEGATIVE)


@dataclass(frozen=True, kw_only=True)
class TrainParams:
    arch: Literal["mlp", "cnn"]
    # cnn only: one block per entry, each convs_per_block[i] × (3×3 conv of filters[i], BN, ReLU)
    # then 2×2 max-pool. Extra convs are cheapest in the later, smaller blocks.
    filters: tuple[int, ...] | None = field(default=None, metadata={**POSITIVE_INTS, "arch": "cnn"})
    convs_per_block: tuple[int, ...] | None = field(default=None, metadata={**POSITIVE_INTS, "arch": "cnn"})
    # cnn only: BatchNormalization's moving-average momentum (Keras' default 0.99). Its inference
    # statistics need ~1/(1 - momentum) × a few steps to settle: lower it for very short runs.
    bn_momentum: float | None = field(default=None, metadata={**FRACTION, "arch": "cnn"})
    # cnn only: pool right after each block's first conv, before its BN and ReLU (the CIFAR-10
    # speed-run block: normalisation and the block's other convs run on a quarter of the pixels).
    pool_first: bool | None = field(default=None, metadata={"arch": "cnn"})
    # cnn only: dense = flatten → dropout → dense_units (BN, ReLU) → dropout → classes;
    # global_max = global max-pool → dropout → classes (no hidden layer; dense_units unused).
    head: Literal["dense", "global_max"] | None = field(default=None, metadata={"arch": "cnn"})
    # cnn only: start the first conv's first filters as the training images' 3×3 patch-whitening
    # filters (and their negatives); start every later conv of a block as the identity.
    whiten_init: bool | None = field(default=None, metadata={"arch": "cnn"})
    identity_init: bool | None = field(default=None, metadata={"arch": "cnn"})
    # cnn only: the BatchNorm biases (beta) learn this many times faster than every other weight
    # (the speed runs' 64× under SGD); 1 = no difference.
    bn_bias_lr_scale: float | None = field(default=None, metadata={**POSITIVE, "arch": "cnn"})
    dense_units: int = field(metadata=POSITIVE)
    dropout: float = field(metadata=PROBABILITY)
    epochs: int = field(metadata=POSITIVE)
    batch_size: int = field(metadata=POSITIVE)
    # adamw: decoupled weight decay; sgd_nesterov: SGD with Nesterov momentum 0.9 and weight_decay.
    optimizer: Literal["adam", "adamw", "sgd_nesterov"]
    learning_rate: float = field(metadata=POSITIVE)
    weight_decay: float = field(metadata=NON_NEGATIVE)
    # cosine: linear warm-up over warmup_epochs, then cosine decay to 0 by the last epoch;
    # linear: the same warm-up, then a straight line to 0 (the one-cycle triangle of the speed runs).
    lr_schedule: Literal["constant", "cosine", "linear"]
    warmup_epochs: float = field(metadata=NON_NEGATIVE)
    label_smoothing: float = field(metadata=PROBABILITY)
    # Keep an exponential moving average of the weights (Keras' use_ema) and save it instead of
    # the last step's weights; 0 = off. Pair it with a fast bn_momentum: the BatchNorm statistics
    # are averaged by their own momentum, not by this one.
    ema_momentum: float = field(metadata=PROBABILITY)
    # 0 turns early stopping off; otherwise stop after this many epochs without val_accuracy gain
    # and restore the best weights.
    early_stopping_patience: int = field(metadata=NON_NEGATIVE)
    # Applied to whole batches by the input pipeline (train.augment_batch): a random half of
    # each batch mirrored left-right, every image moved by a random whole number of pixels in
    # -augment_shift..augment_shift on each axis (zero fill). augment_flip: alternate mirrors a
    # fixed random half of the images in even epochs and the other half in odd ones, so every
    # image is seen both ways in each pair of epochs (the speed runs' alternating flips).
    augment_flip: bool | Literal["alternate"]
    augment_shift: int = field(metadata=_rule(lambda v: 0 <= v <= 8, "must be in 0..8 pixels"))
    augment_erase: float = field(metadata=PROBABILITY)
    # mixed_bfloat16 / mixed_float16 compute in 16 bits (weights stay float32). auto decides by
    # the device that computes (environment.choose_precision) and train prints why.
    precision: Literal["float32", "mixed_bfloat16", "mixed_float16", "auto"]
    # auto: MirroredStrategy when several GPUs are visible, else one device; mirrored: always
    # MirroredStrategy; multi_worker: MultiWorkerMirroredStrategy over the hosts in TF_CONFIG.
    # batch_size is per replica; the learning rate scales with replicas.
    strategy: Literal["auto", "mirrored", "multi_worker"]
    seed: int = field(metadata=NON_NEGATIVE)
    # Test-time augmentation, saved in the model file so evaluate, predict and any copy of the
    # artifact apply the same: average each image's prediction with its mirror's. auto: only for
    # models trained with flips (it costs accuracy on the others); always / never force it.
    tta_flip: Literal["auto", "always", "never"]
    # Also average over copies moved this many pixels up, down, left and right (×2 with flip-TTA:
    # 10 views for 1 px); 0 = off. Also saved in the model file. Costs one inference per view.
    tta_shift: int = field(metadata=_rule(lambda v: 0 <= v <= 3, "must be in 0..3"))
    # After training: fit one temperature on the validation split (wardrobe/calibration.py) so the
    # probabilities mean what they say; saved in the model file, applied by every format.
    calibrate: bool
    # The feature distance beyond which a picture is flagged as unlike the training data: the one
    # this share of validation images stays within (calibration.FeatureDensity; saved in the model file).
    accept_fraction: float = field(metadata=FRACTION)

    def __post_init__(self) -> None:
        if self.filters and self.convs_per_block and len(self.convs_per_block) != len(self.filters):
            raise WardrobeError(
                f"convs_per_block: needs one entry per filters entry ({len(self.filters)}), "
                f"got {len(self.convs_per_block)}"
            )


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = field(metadata=POSITIVE)
    example_grid: int = field(metadata=_rule(lambda v: 1 <= v <= 10, "must be in 1..10"))


UNIT = _rule(lambda v: 0 <= v <= 1, "must be in [0, 1]")


@dataclass(frozen=True)
class ValidateParams:
    # Quality gates `wardrobe validate` applies to metrics/metrics.json.
    min_accuracy: float = field(metadata=UNIT)
    min_class_f1: float = field(metadata=UNIT)
    # With --against REV: the largest allowed drop in test accuracy versus REV's metrics.
    max_drop: float = field(metadata=UNIT)
    # The largest test ECE (expected calibration error of the served, calibrated probabilities).
    max_ece: float = field(metadata=UNIT)


@dataclass(frozen=True)
class Params:
    data: DataParams
    prepare: PrepareParams
    train: TrainParams
    evaluate: EvaluateParams
    validate: ValidateParams


Section = typing.TypeVar("Section", DataParams, PrepareParams, TrainParams, EvaluateParams, ValidateParams)


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and validate all of params.yaml (CI's validate does); a problem names file and key."""
    raw = _read(path)
    try:
        return parse_params(raw)
    except WardrobeError as exc:
        raise WardrobeError(f"{path}: {exc}") from exc


def load_section(cls: type[Section], path: Path = PARAMS_FILE) -> Section:
    """One section, validated alone: a stage checks exactly the params DVC re-runs it for
    (its `params:` in dvc.yaml), so a typo in another stage's section cannot stop it."""
    name = next(name for name, section in typing.get_type_hints(Params).items() if section is cls)
    raw = _read(path)
    try:
        sections = _sections(raw)
        return _build(cls, _required(sections, name, ""), name)
    except WardrobeError as exc:
        raise WardrobeError(f"{path}: {exc}") from exc


def parse_params(raw: Any) -> Params:
    """Validate a whole params mapping (the composed params.yaml)."""
    sections = _sections(raw)
    return Params(
        **{
            name: _build(cls, _required(sections, name, ""), name)
            for name, cls in typing.get_type_hints(Params).items()
        }
    )


def _read(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WardrobeError(f"{path}: cannot read params file: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise WardrobeError(f"{path}: malformed YAML: {' '.join(str(exc).split())}") from exc


def _sections(raw: Any) -> Mapping[str, Any]:
    sections = _as_mapping(raw, "params")
    _reject_unknown(sections, set(typing.get_type_hints(Params)), "")
    return sections


def compose(conf_dir: Path = CONF_DIR, overrides: Sequence[str] = ()) -> str:
    """params.yaml as DVC writes it for `dvc exp run -S OVERRIDE...` (DVC's Hydra composition:
    compose conf/config.yaml with the overrides, resolve, dump with OmegaConf)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(conf_dir.resolve()), version_base=None):
            config = hydra_compose(config_name="config", overrides=list(overrides))
        OmegaConf.resolve(config)
    except (HydraException, OmegaConfBaseException) as exc:
        raise WardrobeError(f"{conf_dir}: cannot compose params: {' '.join(str(exc).split())}") from exc
    return OmegaConf.to_yaml(config)


MISSING = "(missing)"


def disagreements(params: Any, composed: Any, where: str = "") -> list[tuple[str, Any, Any]]:
    """(key, value in params.yaml, value conf/ composes) for each key where the two differ."""
    if isinstance(params, Mapping) and isinstance(composed, Mapping):
        keys = list(composed) + [key for key in params if key not in composed]
        return [
            difference
            for key in keys
            for difference in disagreements(params.get(key, MISSING), composed.get(key, MISSING), f"{where}{key}.")
        ]
    return [] if params == composed else [(where.rstrip("."), params, composed)]


def _build(cls: type, raw: Any, where: str) -> Any:
    values = _as_mapping(raw, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(values, set(fields), f"{where}.")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, fld in fields.items():
        key = f"{where}.{name}"
        gate = next((gate for gate in ("arch", "format") if gate in fld.metadata), None)
        if gate is not None and values.get(gate) != fld.metadata[gate]:
            if name in values:
                raise WardrobeError(
                    f"{key}: only {gate} {fld.metadata[gate]} uses it, not {values.get(gate)}; remove it"
                )
            continue  # keeps the dataclass default (None)
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
    if origin in (types.UnionType, typing.Union):
        # `X | None`: the key is optional by arch, but never null; `bool | Literal[...]`: either.
        members = [arg for arg in args if arg is not type(None)]
        for member in members[:-1]:
            with contextlib.suppress(WardrobeError):
                return _coerce(value, member, key)
        try:
            return _coerce(value, members[-1], key)
        except WardrobeError:
            if len(members) == 1:
                raise
        allowed = " or ".join(_describe(member) for member in members)
        raise WardrobeError(f"{key}: expected {allowed}, got {value!r}") from None
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


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(arg) for arg in typing.get_args(hint))
    return hint.__name__


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
