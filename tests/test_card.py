"""The card stage: metrics/model_card.md states the run's own numbers, read from its files
(conftest's `tiny_run`), and the committed card the committed ones."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO
from wardrobe.outputs import EXPORT_JSON, METRICS_PATH, MODEL_CARD, MODEL_PATH, PER_CLASS_CSV


@pytest.mark.pipeline
def test_the_card_states_the_runs_own_numbers(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wardrobe.card import confused_pairs, read_run, render

    card = (tiny_run / MODEL_CARD).read_text()
    metrics = json.loads((tiny_run / METRICS_PATH).read_text())
    report = json.loads((tiny_run / EXPORT_JSON).read_text())
    params = yaml.safe_load((tiny_run / "params.yaml").read_text())
    assert f"Test accuracy **{metrics['accuracy']:.4f}**, macro-F1 **{metrics['macro_f1']:.4f}**" in card
    assert f"validation accuracy {metrics['val_accuracy']:.4f}" in card
    assert f"MD5 `{hashlib.md5((tiny_run / MODEL_PATH).read_bytes()).hexdigest()}`" in card
    assert "10 views (the image, moved 1 px up, down, left and right, each also mirrored left-right)" in card
    for name, digest in params["data"]["sha256"].items():
        assert f"`{name}`: `{digest}`" in card
    assert "Splits: 90 training, 30 validation" in card and ", 40 test" in card
    assert "```yaml\n" + yaml.safe_dump(params["train"], sort_keys=False) + "```" in card
    for _, row in pd.read_csv(tiny_run / PER_CLASS_CSV).iterrows():
        assert f"| {row['class']} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | 4 |" in card
    assert f"{report['onnx']['top1_agreement']:.2%} | {report['onnx']['max_abs_diff']:.1e} |" in card

    # The confused pairs, counted here independently of the card's code.
    confusion = pd.read_csv(tiny_run / "plots/confusion.csv").to_numpy()
    pairs: dict[tuple[str, str], int] = {}
    for actual, predicted in confusion:
        if actual != predicted:
            pairs[(actual, predicted)] = pairs.get((actual, predicted), 0) + 1
    top = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))[:5]
    assert [(a, p, n) for (a, p), n in top] == [
        tuple(r) for r in confused_pairs(pd.read_csv(tiny_run / "plots/confusion.csv")).to_numpy()
    ]
    for (actual, predicted), count in top:
        assert f"| {actual} | {predicted} | {count} |" in card

    monkeypatch.chdir(tiny_run)
    assert render(read_run()) == card  # same files, same bytes: no dates, no randomness


@pytest.mark.pipeline
def test_a_run_without_mistakes_still_gets_its_card(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wardrobe.card import read_run, render

    monkeypatch.chdir(tiny_run)
    run = read_run()
    card = render(dataclasses.replace(run, confusion=run.confusion.assign(predicted=run.confusion["actual"])))
    assert re.search(r"\d% of the\n  test images are misclassified\.\n", card)
    assert "| actual | predicted as | test images |\n|---|---|---|\n\n## Known limitations" in card


def test_the_committed_card_states_the_committed_numbers() -> None:
    """The committed metrics/model_card.md against the committed metrics, export report and dvc.lock
    (the card stage's own test above covers the rest; this one needs no data)."""
    card = (REPO / MODEL_CARD).read_text()
    metrics = json.loads((REPO / METRICS_PATH).read_text())
    report = json.loads((REPO / EXPORT_JSON).read_text())
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    model_md5 = next(out["md5"] for out in lock["stages"]["train"]["outs"] if out["path"] == str(MODEL_PATH))
    assert f"Test accuracy **{metrics['accuracy']:.4f}**, macro-F1 **{metrics['macro_f1']:.4f}**" in card
    assert f"MD5 `{model_md5}`" in card
    for name in ("saved_model", "onnx"):
        assert f"{report[name]['top1_agreement']:.2%} | {report[name]['max_abs_diff']:.1e} |" in card
    for _, row in pd.read_csv(REPO / PER_CLASS_CSV).iterrows():
        assert f"| {row['class']} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} |" in card
    card_deps = {dep["path"]: dep["md5"] for dep in lock["stages"]["card"]["deps"]}
    for path in (METRICS_PATH, EXPORT_JSON, PER_CLASS_CSV):
        assert card_deps[str(path)] == hashlib.md5((REPO / path).read_bytes()).hexdigest(), path
    card_out = lock["stages"]["card"]["outs"][0]
    assert card_out["md5"] == hashlib.md5(card.encode()).hexdigest()
