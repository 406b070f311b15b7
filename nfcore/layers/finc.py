"""FInCUnit: the flow unit of FInC Flow, four masked convolutions side by side.

Shapes: x, y (B, C, H, W), C divisible by 4; weight (4, C/4, C/4, k, k).

The C channels are split into four quarters; quarter 1 gets a top-left padded masked conv,
quarter 2 top-right, quarter 3 bottom-left, quarter 4 bottom-right, each C/4 → C/4 with its own
weights, and the outputs are concatenated. The four act side by side (not chained), so together
they see every direction, and the inverse solves all four quarters in the same anti-diagonal
sweep (each quarter flipped into the top-left form). logdet = 0 (H·W·Σ s with ``learn_diag``).
"""
from .invconv import CORNERS, GroupedMaskedConv


class FInCUnit(GroupedMaskedConv):
    """Four masked k×k convs on the four channel quarters, one per padding corner."""

    def __init__(self, k=3, channels=None, learn_diag=False, dtype=None, seed=0):
        super().__init__(k, CORNERS, channels, learn_diag, dtype, seed)
