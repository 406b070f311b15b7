"""The coupling networks' pieces: not invertible, forward(x) -> y and backward(dy) -> dx only.

Conv2d (im2col + matmul), ReLU, Conv2dZero (Glow's zero-initialized last conv), and Network,
the coupling network conv3×3 → ReLU → conv1×1 → ReLU → Conv2dZero. Composite gives a layer
made of named parts flattened params / grads ("conv1.weight").
"""
from .composite import Composite, Namespaced, spawn_seed
from .conv2d import Conv2d, col2im, correlate, correlate_transpose, flip, im2col, weight_grad
from .conv2d_zero import Conv2dZero
from .network import Network
from .relu import ReLU
