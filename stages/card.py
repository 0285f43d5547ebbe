"""card: metrics/model_card.md, the model card of this run, for whoever gets the artifact.

Every number in it is read from the run's own files (params.yaml, the prepared data's record, the
model file's record, metrics/*.json, plots/*.csv), so it cannot disagree with them; no dates, so the
same run writes the same bytes. It needs neither TensorFlow nor ONNX Runtime, so it is cheap to
re-run when only its wording changes.
"""

from __future__ import annotations

from wardrobe.card import (
    read_run,
    render,
)
from wardrobe.common import (
    run_main,
    write_text_atomic,
)
from wardrobe.outputs import (
    MODEL_CARD,
)


def main() -> None:
    write_text_atomic(MODEL_CARD, render(read_run()))
    print(f"card: wrote {MODEL_CARD}")


if __name__ == "__main__":
    run_main(main)
