"""wardrobe: a reproducible Fashion-MNIST pipeline (prepare -> train -> evaluate) under DVC."""

import os

# Set before any stage imports TensorFlow: its C++ INFO banner drowns the stage's own output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
