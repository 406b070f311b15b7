"""The coupling networks' pieces: not invertible, forward(x) -> y and backward(dy) -> dx only.

Network is the coupling network conv3×3 → ReLU → conv1×1 → ReLU → Conv2dZero; it takes and
returns channel-first images (B, C, H, W) like every flow layer, and runs its pieces on
channel-last ones (B, H, W, C), converting once on entry and once on exit. In that layout
Conv2d is one matrix product on a contiguous patch matrix (y (B·H·W, O) = cols (B·H·W, k·k·C) @
Wmat (k·k·C, O), or the output side expanded when C > O); im2col / col2im build and undo the
patch matrix (Numba kernels, with NumPy references). Conv2dZero is Glow's zero-initialized last
conv, ReLU the rectifier (any layout). Composite gives a layer made of named parts flattened
params / grads ("conv1.weight"). fused holds the one-pass Numba forms of the elementwise work
(bias + ReLU, Conv2dZero's bias and scale, the affine coupling's formulas) beside their NumPy
references; ``fused.FUSED = False`` runs the references.
"""
from .composite import Composite, Namespaced, spawn_seed
from .conv2d import (Conv2d, check_channel_last, conv_backward_input_side, conv_backward_output_side,
                     conv_forward_input_side, conv_forward_output_side, input_side_weight,
                     output_side_weight)
from .conv2d_zero import Conv2dZero
from .patches import (col2im, col2im_into, col2im_numba, col2im_numpy, im2col, im2col_into,
                      im2col_numba, im2col_numpy)
from .network import Network, channel_first, channel_last
from .relu import ReLU
