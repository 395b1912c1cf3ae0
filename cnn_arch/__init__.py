"""cnn_arch: classic CNN architectures and fine-tuning them, in JAX/Flax."""

import os

# TensorFlow (the input pipeline) logs INFO lines about oneDNN at import; keep warnings only.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

# XLA:CPU's YNNPACK weight-gradient convolutions are slower than its Eigen ones on ResNet
# (docs/performance.md); XLA reads the flag when JAX starts its CPU backend, so set it here.
from cnn_arch.ops.conv import use_eigen_cpu_convolutions  # noqa: E402

use_eigen_cpu_convolutions()
