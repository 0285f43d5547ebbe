"""wardrobe: a reproducible Fashion-MNIST pipeline (prepare -> train -> evaluate) under DVC.

TensorFlow prints an INFO banner from C++ when it loads (CPU instructions it was not built for,
and absl's "All log messages before absl::InitializeLog()" line), which would bury our one-line
errors. TF_CPP_MIN_LOG_LEVEL=1 hides TensorFlow's INFO logs, that banner included, and nothing
else: its warnings and errors, and any other native output, still reach stderr. It takes effect
only if set before TensorFlow is imported (importing keras first imports TensorFlow), and a value
the user set wins.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
