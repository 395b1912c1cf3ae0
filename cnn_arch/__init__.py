"""cnn_arch: classic CNN architectures and fine-tuning them, in JAX/Flax.

Importing it changes one process-wide setting: on jaxlib 0.10 and 0.12 it appends
`--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` to `XLA_FLAGS` (unless that
option is already there), so that XLA:CPU runs convolutions on its Eigen kernels. It affects
CPU only, and only if JAX's CPU backend has not started yet; set the option yourself before the
import to keep XLA's default (`cnn_arch.ops.conv.use_eigen_cpu_convolutions`).
"""

import os

# TensorFlow (the input pipeline) logs INFO lines about oneDNN at import; keep warnings only.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

# XLA:CPU's YNNPACK weight-gradient convolutions are slower than its Eigen ones on ResNet
# (docs/performance.md); XLA reads the flag when JAX starts its CPU backend, so set it here.
from cnn_arch.ops.conv import use_eigen_cpu_convolutions  # noqa: E402

use_eigen_cpu_convolutions()
