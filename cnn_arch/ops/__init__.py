"""Custom operations that make cnn_arch's models train fast where stock XLA kernels are slow."""

from cnn_arch.ops.conv import conv_general_dilated, default_conv_general_dilated
