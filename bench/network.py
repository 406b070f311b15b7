"""Benchmark of the coupling network (nfcore.nn.Network): forward + backward, and each conv.

    python bench/network.py                 # the small and wide shapes, all cores
    python bench/network.py --threads 1     # BLAS, Numba (and torch) on one thread
    python bench/network.py --torch         # + the same network in PyTorch, and the ratio

The shapes are those of a 3×32×32 flow with L = 3 levels (squeezed to 12, 24, 48 channels at
16×16, 8×8, 4×4): an affine coupling's network reads half of the channels and writes two values
(shift, scale) per channel of the other half::

    small   B = 64, width 64:   6 -> 64 -> 64 -> 12 at 16×16, 12 -> .. -> 24 at 8×8, 24 -> .. -> 48 at 4×4
    wide    B = 16, width 512:  the same, with 512 hidden channels

Rows: the whole network (forward + backward, dx and every parameter's gradient, as a coupling
runs it), then each of its three convolutions alone (forward + backward on the input the
network gives it), with its rate in GFLOP/s: 3 · 2·B·H·W·C·O·k² flops (forward, dx, dweight).
Every figure is the best of several runs in this one process, float32.

``--torch``: the same network in PyTorch (torch.nn.functional.conv2d on channels-last tensors,
oneDNN's fastest memory format at these shapes, autograd backward for x and every parameter,
torch.set_num_threads = the same thread count), and nfcore / torch: above 1 nfcore is slower. torch is never a dependency of nfcore; it is only imported here.
"""
import argparse
import importlib.util
import time

import train  # noqa: F401  (first, before NumPy: OpenBLAS's idle wait as the command lines set it)
import numba
import numpy as np
import threadpoolctl

from nfcore.nn import Network

SHAPES = {   # name: (batch, width, [(C_in, C_out, H) per level])
    "small": (64, 64, [(6, 12, 16), (12, 24, 8), (24, 48, 4)]),
    "wide": (16, 512, [(6, 12, 16), (12, 24, 8), (24, 48, 4)]),
}
CONVS = ("conv1", "conv2", "conv3")


def best_time(fn, budget=1.0, most=20):
    """The best wall time of several calls (as many as fit ``budget`` seconds), after a warm-up."""
    fn()
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = [first]
    for _ in range(int(max(1, min(most, budget / max(first, 1e-6))))):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def random_network(C_in, C_out, hidden, rng):
    """A float32 Network with every parameter random (the zero-initialized last conv too)."""
    net = Network(C_out, hidden, in_channels=C_in, dtype=np.float32)
    for name, param in net.params.items():
        fan_in = np.prod(param.shape[1:]) if param.ndim == 4 else 1
        param[...] = rng.standard_normal(param.shape) * (0.1 if name.endswith("logs") else
                                                         np.sqrt(1.0 / fan_in))
    return net


def conv_inputs(net, x):
    """What the network's forward hands each of its convs (in whatever layout it uses). Every
    conv's forward goes through its forward_linear (the hidden convs' bias is added in the fused
    ReLU, Conv2dZero's in its fused scaling), so that is where the input is seen."""
    seen = {}
    for name in CONVS:
        conv = net.parts[name]

        def capture(h, forward_linear=conv.forward_linear, name=name):
            seen[name] = h.copy()
            return forward_linear(h)
        conv.forward_linear = capture
    net.forward(x)
    for name in CONVS:
        del net.parts[name].forward_linear    # back to the class's method
    return seen


def nfcore_times(net, x, rng):
    """{"network": s, "conv1": s, ...}: forward + backward, best time."""
    dh = rng.standard_normal(net.forward(x).shape).astype(np.float32)

    def network():
        net.forward(x)
        net.backward(dh)
    times = {"network": best_time(network)}
    for name, h in conv_inputs(net, x).items():
        conv = net.parts[name]
        dy = rng.standard_normal(conv.forward(h).shape).astype(np.float32)

        def one_conv(conv=conv, h=h, dy=dy):
            conv.forward(h)
            conv.backward(dy)
        times[name] = best_time(one_conv)
    return times


def torch_times(net, x, rng, threads):
    """The same network and convs in PyTorch (channels-last), with net's parameters."""
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(threads)

    def tensor(value):
        t = torch.tensor(np.asarray(value))
        return t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t
    p = {name: tensor(value).requires_grad_(True) for name, value in net.params.items()}
    xt = tensor(x).requires_grad_(True)

    def forward(h):
        h = F.relu(F.conv2d(h, p["conv1.weight"], p["conv1.bias"], padding=1))
        h = F.relu(F.conv2d(h, p["conv2.weight"], p["conv2.bias"]))
        u = F.conv2d(h, p["conv3.weight"], p["conv3.bias"], padding=1)
        return u * torch.exp(3.0 * p["conv3.logs"])[None, :, None, None]
    with torch.no_grad():
        h1 = F.relu(F.conv2d(xt, p["conv1.weight"], p["conv1.bias"], padding=1))
        h2 = F.relu(F.conv2d(h1, p["conv2.weight"], p["conv2.bias"]))
        out_shape = forward(xt).shape
    dh = tensor(rng.standard_normal(out_shape).astype(np.float32))

    def network():
        forward(xt).backward(dh)
    times = {"network": best_time(network)}
    for name, h in zip(CONVS, (xt, h1, h2)):
        h = h.detach().requires_grad_(True)
        w, b = p[f"{name}.weight"], p[f"{name}.bias"]
        with torch.no_grad():
            dy = tensor(torch.randn(F.conv2d(h, w, b, padding=w.shape[-1] // 2).shape))

        def one_conv(h=h, w=w, b=b, dy=dy):
            F.conv2d(h, w, b, padding=w.shape[-1] // 2).backward(dy)
        times[name] = best_time(one_conv)
    return times


def conv_flops(B, H, C, O, k):
    return 3 * 2 * B * H * H * C * O * k * k


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["small", "wide"])
    parser.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS,
                        help="threads for BLAS, Numba and torch (default: all cores)")
    parser.add_argument("--torch", action="store_true", help="add the PyTorch column")
    args = parser.parse_args()
    with_torch = args.torch and importlib.util.find_spec("torch") is not None
    if args.torch and not with_torch:
        print("torch is not installed: no PyTorch column")
    numba.set_num_threads(args.threads)
    threadpoolctl.threadpool_limits(args.threads, user_api="blas")
    print(f"float32, {args.threads} thread(s), Numba threading layer "
          f"{numba.config.THREADING_LAYER!r}; milliseconds, best of several runs")
    header = f"{'shape':<24}{'part':<10}{'nfcore':>9}{'GFLOP/s':>9}"
    if with_torch:
        header += f"{'torch':>9}{'GFLOP/s':>9}{'ratio':>7}"
    print(header)
    rng = np.random.default_rng(0)
    for shape_name in args.shapes:
        B, hidden, levels = SHAPES[shape_name]
        for C_in, C_out, H in levels:
            net = random_network(C_in, C_out, hidden, rng)
            x = rng.standard_normal((B, C_in, H, H)).astype(np.float32)
            ours = nfcore_times(net, x, rng)
            theirs = torch_times(net, x, rng, args.threads) if with_torch else {}
            flops = {"conv1": conv_flops(B, H, C_in, hidden, 3),
                     "conv2": conv_flops(B, H, hidden, hidden, 1),
                     "conv3": conv_flops(B, H, hidden, C_out, 3)}
            flops["network"] = sum(flops.values())
            label = f"{shape_name} {C_in}->{hidden}->{C_out} {H}x{H}"
            for part in ("network",) + CONVS:
                line = f"{label if part == 'network' else '':<24}{part:<10}"
                line += f"{ours[part] * 1e3:>9.2f}{flops[part] / ours[part] / 1e9:>9.1f}"
                if with_torch:
                    line += (f"{theirs[part] * 1e3:>9.2f}{flops[part] / theirs[part] / 1e9:>9.1f}"
                             f"{ours[part] / theirs[part]:>7.2f}")
                print(line)


if __name__ == "__main__":
    main()
