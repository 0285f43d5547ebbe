"""The five DVC stages: dvc.yaml runs `python -m stages.NAME` (prepare, train, evaluate, export,
card); each reads its inputs, calls the wardrobe library (src/wardrobe) and writes its outputs.

A stage runs the library of its own checkout, the code dvc.yaml lists as its dependencies and DVC
hashed, not whichever wardrobe the Python has installed (a second clone sharing a venv would
otherwise run the first clone's code). Importing wardrobe first also sets up TensorFlow's
environment (oneDNN, quiet logs) before any stage imports Keras (wardrobe/__init__.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import wardrobe  # noqa: F401
