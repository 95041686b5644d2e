#!/usr/bin/env python3
"""What oneDNN's convolutions reach alone, layer by layer, for the model's 3x3 shapes.

    bench_layers.py [--batch B] [--threads T] [--reps R]

For each (in, out, side) of the default LIDC model (filters 32, 64, 128, 192 at
128x128), prints GFLOP/s of the forward pass, the data gradient and the weight gradient,
channels-last and NCHW; then three ways the weight gradient or three networks' layers
could be computed instead (NCHW weight gradients with the layout change paid, and one
grouped convolution for three same-shaped ones). Best of R timed repetitions after a
warm-up, on PyTorch's own kernels (the ones probunet and the port both call), so it says
what scheduling around those kernels can reach. docs/performance.md cites its figures.
"""
import argparse
import time

import torch

SHAPES = [(32, 32, 128), (64, 64, 64), (128, 128, 32), (192, 192, 16), (96, 32, 128),
          (192, 64, 64), (320, 128, 32)]


def best_time(fn, reps):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def backward(grad, x, weight, mask):
    out = weight.shape[0]
    return torch.ops.aten.convolution_backward(
        grad, x, weight, [out], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)


def layer(cin, cout, side, batch, layout, reps):
    x = torch.randn(batch, cin, side, side).to(memory_format=layout)
    conv = torch.nn.Conv2d(cin, cout, 3, padding=1).to(memory_format=layout)
    with torch.no_grad():
        grad = torch.randn_like(conv(x))
    flop = 2 * 9 * cin * cout * side * side * batch
    fwd = best_time(lambda: conv(x), reps)
    data = best_time(lambda: backward(grad, x, conv.weight, [True, False, False]), reps)
    weights = best_time(lambda: backward(grad, x, conv.weight, [False, True, True]), reps)
    return [flop / t / 1e9 for t in (fwd, data, weights)], (x, grad, conv)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cl = torch.channels_last
    print(f"batch {args.batch}, {torch.get_num_threads()} threads, "
          f"ISA {torch.backends.cpu.get_cpu_capability()}; GFLOP/s")
    print(f"{'layer':>14}  {'fwd CL':>7} {'data CL':>7} {'wgt CL':>7}  "
          f"{'fwd NCHW':>8} {'data NCHW':>9} {'wgt NCHW':>8}  {'wgt NCHW+conv ms':>16} "
          f"{'wgt CL ms':>9}  {'3 convs ms':>10} {'grouped ms':>10}")
    for cin, cout, side in SHAPES:
        rates_cl, (x, grad, conv) = layer(cin, cout, side, args.batch, cl, args.reps)
        rates_nchw, _ = layer(cin, cout, side, args.batch, torch.contiguous_format, args.reps)
        w_cl = best_time(lambda: backward(grad, x, conv.weight, [False, True, True]), args.reps)
        w_nchw = best_time(lambda: backward(grad.contiguous(), x.contiguous(),
                                            conv.weight.contiguous(), [False, True, True]),
                           args.reps)
        separate, grouped = "", ""
        if cin == cout:
            separate, grouped = three_networks(cin, side, args.batch, args.reps)
        print(f"{cin:>4}->{cout:<4}@{side:<4} "
              + " ".join(f"{r:7.0f}" for r in rates_cl) + "  "
              + " ".join(f"{r:8.0f}" for r in rates_nchw)
              + f"  {w_nchw * 1e3:16.2f} {w_cl * 1e3:9.2f}  {separate:>10} {grouped:>10}")


def three_networks(channels, side, batch, reps):
    """Forward and backward of three same-shaped convs, separately and as one grouped."""
    cl = torch.channels_last

    def step(conv, x, grad):
        conv(x).backward(grad)

    def made(cin, groups):
        x = torch.randn(batch, cin, side, side).to(memory_format=cl).requires_grad_()
        conv = torch.nn.Conv2d(cin, cin, 3, padding=1, groups=groups).to(memory_format=cl)
        return conv, x, torch.randn(batch, cin, side, side).to(memory_format=cl)

    three = [made(channels, 1) for _ in range(3)]
    one = made(3 * channels, 3)
    separate = best_time(lambda: [step(*c) for c in three], reps)
    grouped = best_time(lambda: step(*one), reps)
    return f"{separate * 1e3:.2f}", f"{grouped * 1e3:.2f}"


if __name__ == "__main__":
    main()
