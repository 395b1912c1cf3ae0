"""Convolution kernels and settings for fast training where stock XLA kernels are slow.

`use_eigen_cpu_convolutions()` (called when `cnn_arch` is imported) makes XLA:CPU run
convolutions on its Eigen kernels instead of YNNPACK, whose weight gradients are slower on
ResNet (docs/performance.md). `conv_general_dilated` is an exact custom-VJP convolution whose
gradients are matrix products; models take it through their `conv_general_dilated` option.
`default_conv_general_dilated`, every model's convolution, also stops XLA:CPU from fusing an
activation's producers into the transposes of its weight gradient (`conv._fusion_barrier`).
"""

from cnn_arch.ops.conv import (CPU_XLA_FLAG, conv_general_dilated, default_conv_general_dilated,
                               use_eigen_cpu_convolutions)
