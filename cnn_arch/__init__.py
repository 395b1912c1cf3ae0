"""cnn_arch: classic CNN architectures and fine-tuning them, in JAX/Flax."""

import os

# TensorFlow (the input pipeline) logs INFO lines about oneDNN at import; keep warnings only.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
