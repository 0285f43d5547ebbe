"""The original script, as the baseline the benchmark times: same model, 5 epochs, batch 32,
validation on the test set, curves drawn with matplotlib.

The only change: it reads the IDX files from a local directory (no network here) instead of
`keras.datasets.fashion_mnist.load_data()`, which downloads the same files.
Usage: python -m bench.original DATA_DIR OUT_PNG
"""

from __future__ import annotations

import sys
from pathlib import Path

import wardrobe  # noqa: F401  (quiets TensorFlow's banner like the pipeline does)


def load_data(directory: Path):
    import yaml

    from wardrobe.data.preparation import decompress, parse_idx

    # The file names of the dataset the original script loads, from its config.
    config = Path(__file__).resolve().parent.parent / "conf/data/fashion_mnist.yaml"
    files = yaml.safe_load(config.read_text(encoding="utf-8"))["files"]

    def read(name: str):
        return parse_idx(decompress((directory / f"{name}.gz").read_bytes()), name)

    return tuple((read(images), read(labels)) for images, labels in (files["train"], files["test"]))


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tensorflow as tf

    (train_images, train_labels), (test_images, test_labels) = load_data(Path(sys.argv[1]))
    train_images = train_images / 255.0
    test_images = test_images / 255.0

    model = tf.keras.Sequential(
        [
            tf.keras.layers.Input(shape=(28, 28)),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(128, activation="relu"),
            tf.keras.layers.Dropout(0.2),
            tf.keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(train_images, train_labels, epochs=5, validation_data=(test_images, test_labels), verbose=2)
    _, test_acc = model.evaluate(test_images, test_labels, verbose=0)
    print(f"test_accuracy={test_acc:.4f}")

    plt.figure(figsize=(10, 4))
    for i, metric in enumerate(("accuracy", "loss")):
        plt.subplot(1, 2, i + 1)
        plt.plot(history.history[metric], label="train")
        plt.plot(history.history[f"val_{metric}"], label="val")
        plt.legend()
    plt.savefig(sys.argv[2])


if __name__ == "__main__":
    main()
