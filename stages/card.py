"""card: metrics/model_card.md, the model card of this run, from the run's own files
(src/wardrobe/card.py says which, and why it needs neither TensorFlow nor ONNX Runtime)."""

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
