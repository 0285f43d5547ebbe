from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, committed_params
from wardrobe.common import WardrobeError
from wardrobe.params import PrepareParams, TrainParams, compose, load_params, load_section, parse_params


def test_repo_params_load() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.prepare.val_fraction == 0.1
    assert params.data.sources[0] == "/usr/share/datasets/fashion-mnist"
    assert params.data.name == "Fashion-MNIST" and len(params.data.class_names) == 10
    assert params.train.arch == "cnn"


def test_committed_params_yaml_is_the_composition_of_conf() -> None:
    """params.yaml is what `dvc exp run` writes from conf/; a hand edit or a stale file fails here."""
    assert (REPO / "params.yaml").read_text() == compose(REPO / "conf")


@pytest.mark.parametrize("recipe", sorted(path.stem for path in (REPO / "conf/train").glob("*.yaml")))
def test_every_recipe_composes_and_validates(recipe: str) -> None:
    train = parse_params(yaml.safe_load(compose(REPO / "conf", [f"train={recipe}"]))).train
    assert (train.filters is None) == (train.arch == "mlp")  # conv keys only where they are used


def test_original_recipe_is_the_original_script(idx_source: tuple[Path, dict[str, str]]) -> None:
    train = parse_params(committed_params(*idx_source, "train=original")).train
    assert (train.arch, train.dense_units, train.dropout) == ("mlp", 128, 0.2)
    assert (train.epochs, train.batch_size, train.optimizer, train.learning_rate) == (5, 32, "adam", 0.001)
    assert (train.lr_schedule, train.label_smoothing, train.precision) == ("constant", 0.0, "float32")
    assert not (train.augment_flip or train.augment_shift or train.augment_erase)


def test_overrides_compose_like_dvc_set_param() -> None:
    mlp = yaml.safe_load((REPO / "conf/train/mlp.yaml").read_text())
    train = yaml.safe_load(compose(REPO / "conf", ["train=mlp", "train.epochs=1"]))["train"]
    assert train == {**mlp, "epochs": 1}  # the whole recipe switched, one key set on top


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epochz=1"], r"conf: cannot compose params: Could not override 'train\.epochz'"),
        (["train=huge"], r"conf: cannot compose params: .*train/huge"),
    ],
)
def test_bad_override_names_it(overrides: list[str], message: str) -> None:
    with pytest.raises(WardrobeError, match=message):
        compose(REPO / "conf", overrides)


def test_conv_keys_belong_to_the_cnn_only(params_dict: dict) -> None:
    params_dict["train"]["filters"] = [8]  # the mlp recipe has no conv trunk
    with pytest.raises(WardrobeError, match=r"^train\.filters: only arch cnn uses it, not mlp; remove it$"):
        parse_params(params_dict)
    cnn = yaml.safe_load((REPO / "conf/train/cnn.yaml").read_text())
    del cnn["convs_per_block"]
    with pytest.raises(WardrobeError, match=r"^train\.convs_per_block: missing key$"):
        parse_params({**params_dict, "train": cnn})


def test_a_stage_validates_only_its_own_section(tmp_path: Path, params_dict: dict) -> None:
    """DVC re-runs a stage when its section changes, and the stage validates that section: a typo in
    train stops train, not prepare (which does not depend on it)."""
    params_dict["train"]["epochz"] = 3
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params_dict))
    assert load_section(PrepareParams, path).val_fraction == 0.25
    with pytest.raises(WardrobeError, match=rf"^{path}: train\.epochz: unknown key"):
        load_section(TrainParams, path)
    with pytest.raises(WardrobeError, match=rf"^{path}: train\.epochz: unknown key"):
        load_params(path)


def test_int_accepted_for_float(params_dict: dict) -> None:
    params_dict["train"]["learning_rate"] = 1
    assert parse_params(params_dict).train.learning_rate == 1.0


def _set(d: dict, dotted: str, value: object) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        d = d[key]
    d[last] = value


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.epochz", 3, r"train\.epochz: unknown key"),
        ("prepare.colour", "red", r"prepare\.colour: unknown key"),
        ("evaluate.tta", True, r"evaluate\.tta: unknown key"),
        ("extra", {}, r"extra: unknown key"),
        ("train.epochs", "5", r"train\.epochs: expected int, got str"),
        ("train.epochs", True, r"train\.epochs: expected int, got bool"),
        ("train.epochs", 2.5, r"train\.epochs: expected int, got float"),
        ("train.augment_flip", 1, r"train\.augment_flip: expected bool or 'alternate', got 1"),
        ("train.augment_flip", "sometimes", r"train\.augment_flip: expected bool or 'alternate', got 'sometimes'"),
        ("train.lr_schedule", "onecycle", r"train\.lr_schedule: 'onecycle' is not one of \[.*'linear'\]"),
        ("train.epochs", 0, r"train\.epochs: must be > 0, got 0"),
        ("train.learning_rate", -0.1, r"train\.learning_rate: must be > 0"),
        ("train.dropout", 1.0, r"train\.dropout: must be in \[0, 1\)"),
        ("train.arch", "resnet", r"train\.arch: 'resnet' is not one of \['mlp', 'cnn'\]"),
        ("train.optimizer", "sgd", r"train\.optimizer: 'sgd' is not one of"),
        ("prepare.val_fraction", 1.0, r"prepare\.val_fraction: must be in \(0, 1\)"),
        ("prepare.val_fraction", 0, r"prepare\.val_fraction: must be in \(0, 1\)"),
        ("data.sources", [], r"data\.sources: must not be empty"),
        ("data.sha256", {"x": "y"}, r"data\.sha256: must map exactly train-images-idx3-ubyte, "),
        (
            "data.files",
            {"train": ["a", "b"]},
            r"data\.files: must map train and test each to \[images file, labels file\]",
        ),
        ("data.class_names", ["one"], r"data\.class_names: needs at least two distinct names, got \['one'\]"),
        ("data.class_names", ["a", "a"], r"data\.class_names: needs at least two distinct names"),
        ("data.format", "csv", r"data\.format: 'csv' is not one of \['idx', 'folder'\]"),
        ("data.photo_fit", "crop", r"data\.photo_fit: 'crop' is not one of \['object', 'resize'\]"),
        ("evaluate.example_grid", 11, r"evaluate\.example_grid: must be in 1\.\.10"),
        ("evaluate", None, r"evaluate: expected a mapping"),
        ("validate.min_accuracy", 1.5, r"validate\.min_accuracy: must be in \[0, 1\]"),
    ],
)
def test_invalid_params_name_the_key(params_dict: dict, key: str, value: object, message: str) -> None:
    _set(params_dict, key, value)
    with pytest.raises(WardrobeError, match=message):
        parse_params(params_dict)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.filters", [32, 0], r"train\.filters: must be positive ints"),
        ("train.filters", 32, r"train\.filters: expected a list"),
        ("train.filters", None, r"train\.filters: expected a list, got NoneType"),
        ("train.convs_per_block", [1, 2], r"train\.convs_per_block: needs one entry per filters entry \(3\), got 2"),
        ("train.bn_bias_lr_scale", 0.0, r"train\.bn_bias_lr_scale: must be > 0, got 0.0"),
    ],
)
def test_invalid_cnn_params_name_the_key(
    idx_source: tuple[Path, dict[str, str]], key: str, value: object, message: str
) -> None:
    params = committed_params(*idx_source, "train=cnn")
    _set(params, key, value)
    with pytest.raises(WardrobeError, match=message):
        parse_params(params)


@pytest.mark.parametrize("section", ["prepare", "train", "evaluate", "validate"])
def test_missing_section(params_dict: dict, section: str) -> None:
    del params_dict[section]
    with pytest.raises(WardrobeError, match=rf"^{section}: missing key"):
        parse_params(params_dict)


def test_missing_key_in_section(params_dict: dict) -> None:
    del params_dict["prepare"]["seed"]
    with pytest.raises(WardrobeError, match=r"prepare\.seed: missing key"):
        parse_params(params_dict)


def test_malformed_yaml(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(WardrobeError, match=rf"{path}: malformed YAML"):
        load_params(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WardrobeError, match=r"nope\.yaml: cannot read params file"):
        load_params(tmp_path / "nope.yaml")


def test_load_names_file(tmp_path: Path, params_dict: dict) -> None:
    params_dict["train"]["epochs"] = -1
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params_dict))
    with pytest.raises(WardrobeError, match=rf"^{path}: train\.epochs: must be > 0"):
        load_params(path)
