"""Plain NumPy versions of the kernels: short, readable, and the references the tests hold
the Numba CPU and CUDA kernels to. In the canonical grouped channel-last layout (that of
``cuda.py``; ``cpu.py`` is batch-last and the tests transpose for it)::

    x, y : (G, B, H, W, C)        w : (G, k, k, C_in, C_out)

They work on CuPy arrays too (everything goes through ``xp``).
"""
from ..backend import get_array_module
from . import CANONICAL_AXES, from_groups_by_transpose, to_groups_by_transpose

AXES = CANONICAL_AXES


def to_groups(x, flips):
    """(B, C, H, W) -> (G, B, H, W, Cg), each group in its top-left form (see kernels/__init__)."""
    return to_groups_by_transpose(x, flips, AXES)


def from_groups(xg, flips, n_images):
    """The inverse of ``to_groups``: (G, B, H, W, Cg) -> (B, G·Cg, H, W); B == n_images here
    (the CPU layout pads its batch axis, this one does not)."""
    return from_groups_by_transpose(xg, flips, AXES)


def _pad_top_left(x, k):
    """Zero-pad the height and width axes with k-1 rows on top and k-1 columns on the left."""
    xp = get_array_module(x)
    return xp.pad(x, ((0, 0), (0, 0), (k - 1, 0), (k - 1, 0), (0, 0)))


def conv_forward(x, w):
    """y[g,n,i,j,:] = sum_{a,b} x[g,n,i-(k-1)+a, j-(k-1)+b, :] @ w[g,a,b]."""
    xp = get_array_module(x)
    G, B, H, W, _ = x.shape
    k = w.shape[1]
    x_padded = _pad_top_left(x, k)
    y = xp.zeros((G, B, H, W, w.shape[4]), dtype=x.dtype)
    for a in range(k):
        for b in range(k):
            y += xp.einsum("gnhwi,gio->gnhwo", x_padded[:, :, a:a + H, b:b + W], w[:, a, b])
    return y


def conv_input_grad(dy, w):
    """dx[g,n,i,j,:] = sum_{a,b} w[g,a,b] @ dy[g,n,i+(k-1)-a, j+(k-1)-b, :] (zero past the edge)."""
    xp = get_array_module(dy)
    G, B, H, W, _ = dy.shape
    k = w.shape[1]
    dy_padded = xp.pad(dy, ((0, 0), (0, 0), (0, k - 1), (0, k - 1), (0, 0)))
    dx = xp.zeros((G, B, H, W, w.shape[3]), dtype=dy.dtype)
    for a in range(k):
        for b in range(k):
            shifted = dy_padded[:, :, k - 1 - a:k - 1 - a + H, k - 1 - b:k - 1 - b + W]
            dx += xp.einsum("gnhwo,gio->gnhwi", shifted, w[:, a, b])
    return dx


def conv_weight_grad(x, dy, k):
    """dw[g,a,b,ci,co] = sum_{n,i,j} x[g,n,i-(k-1)+a, j-(k-1)+b, ci] * dy[g,n,i,j,co]."""
    xp = get_array_module(x)
    G, B, H, W, C_in = x.shape
    x_padded = _pad_top_left(x, k)
    dw = xp.zeros((G, k, k, C_in, dy.shape[4]), dtype=x.dtype)
    for a in range(k):
        for b in range(k):
            dw[:, a, b] = xp.einsum("gnhwi,gnhwo->gio", x_padded[:, :, a:a + H, b:b + W], dy)
    return dw


def _solve_pixels(x_padded, y, w, rows, cols):
    """Solve the pixels (rows[p], cols[p]) of x (held padded), given all they depend on.

    r = y - (every tap but the self-tap) applied to x, then forward substitution through the
    lower-triangular self-tap L = w[:, k-1, k-1].T, channel by channel.
    """
    xp = get_array_module(y)
    k = w.shape[1]
    r = y[:, :, rows, cols, :].copy()                           # (G, B, P, C)
    for a in range(k):
        for b in range(k):
            if a == b == k - 1:
                continue
            neighbours = x_padded[:, :, rows + a, cols + b, :]  # padded index of i-(k-1)+a
            r -= xp.einsum("gnpi,gio->gnpo", neighbours, w[:, a, b])
    self_tap = w[:, k - 1, k - 1]                               # (G, C_in, C_out)
    for c in range(r.shape[-1]):
        r[..., c] -= xp.einsum("gnpi,gi->gnp", r[..., :c], self_tap[:, :c, c])
        r[..., c] /= self_tap[:, c, c][:, None, None]
    x_padded[:, :, rows + k - 1, cols + k - 1, :] = r


def wavefront_inverse(y, w):
    """Solve conv_forward(x, w) = y for x: H+W-1 steps, one per anti-diagonal i + j = d."""
    xp = get_array_module(y)
    G, B, H, W, C = y.shape
    k = w.shape[1]
    x_padded = _pad_top_left(xp.zeros_like(y), k)
    for d in range(H + W - 1):
        rows = xp.arange(max(0, d - (W - 1)), min(H - 1, d) + 1)
        _solve_pixels(x_padded, y, w, rows, d - rows)
    return x_padded[:, :, k - 1:, k - 1:, :].copy()


def raster_inverse(y, w):
    """The same solve in H·W steps, one pixel at a time in raster order (Emerging's way)."""
    xp = get_array_module(y)
    G, B, H, W, C = y.shape
    k = w.shape[1]
    x_padded = _pad_top_left(xp.zeros_like(y), k)
    for i in range(H):
        for j in range(W):
            _solve_pixels(x_padded, y, w, xp.array([i]), xp.array([j]))
    return x_padded[:, :, k - 1:, k - 1:, :].copy()
