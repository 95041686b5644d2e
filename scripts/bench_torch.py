"""The PyTorch side of `probunet bench`: the same model, the same synthetic 128x128 data
and the same protocol, for one setting, printed as one JSON line.

    bench_torch.py --batch B --precision fp32|bf16 --device cpu|cuda[:N] --steps S
                   --warmup W --samples N [--compile] [--threads T] [--port DIR]

Without --port the model is scripts/torch_probunet.py (written from spec/model.md); with
--port DIR it is the widely used PyTorch port itself (DIR/probabilistic_unet.py, its own
classes, the seed's config) with its train_model.py loss:
-elbo + 1e-5 * (l2(posterior) + l2(prior) + l2(fcomb.layers)).

Times are medians over the timed steps (and sampling passes), as probunet's side reports.
Training: forward, ELBO, backward and an Adam step per batch (the seed's loop as written,
with the loss read back every step as the seed's logging does). Sampling: prior and U-Net
once per image, fcomb per sample, thresholded, `samples` per image.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from torch_probunet import ProbUNet  # noqa: E402
from check_export import import_port  # noqa: E402


class Port:
    """The port's ProbabilisticUnet behind the interface the benchmark calls."""

    def __init__(self, port_dir, device):
        ProbabilisticUnet = import_port(port_dir)
        from utils import l2_regularisation

        self.l2 = l2_regularisation
        self.net = ProbabilisticUnet(input_channels=1, num_classes=1,
                                     num_filters=[32, 64, 128, 192], latent_dim=2,
                                     no_convs_fcomb=4, beta=10.0).to(device)

    def parameters(self):
        return self.net.parameters()

    def elbo(self, image, mask):
        net = self.net
        net.forward(image, mask, training=True)
        elbo = net.elbo(mask)
        reg = self.l2(net.posterior) + self.l2(net.prior) + self.l2(net.fcomb.layers)
        return {"loss": -elbo + 1e-5 * reg}

    def sample(self, image, n):
        net = self.net
        net.forward(image, None, training=False)
        return torch.stack([net.sample(testing=True) for _ in range(n)], 1)


def onednn_isa():
    """ATen's vector ISA, lowered to what ONEDNN_MAX_CPU_ISA lets oneDNN's kernels use."""
    aten = torch.backends.cpu.get_cpu_capability()
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if cap.startswith("AVX2") and aten.startswith("AVX512"):
        return "AVX2"
    if cap in ("AVX", "SSE41"):
        return "other"
    return aten


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, reps, device):
    """The median seconds of `reps` calls of `fn`, as probunet's side times its own."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--port", help="the PyTorch port's folder: race it instead")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = Port(args.port, device) if args.port else ProbUNet().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    bf16 = args.precision == "bf16"
    if bf16 and device.type == "cuda" and not args.port:
        model = model.to(memory_format=torch.channels_last)
    image = torch.rand(args.batch, 1, args.size, args.size, device=device)
    mask = (torch.rand_like(image) > 0.5).float()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            terms = model.elbo(image, mask)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        return terms["loss"].item()

    train = torch.compile(step) if args.compile else step
    for _ in range(args.warmup):
        train()
    sync(device)
    train_s = median_time(train, max(1, args.steps), device)

    @torch.no_grad()
    def sample():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model.sample(image, args.samples)
        return (logits.float().sigmoid() > 0.5).sum()

    sample()
    sync(device)
    sample_s = median_time(sample, max(1, args.steps // 2), device)

    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({
        "impl": ("seed-port" if args.port else "pytorch") + ("+compile" if args.compile else ""),
        "batch": args.batch, "precision": args.precision, "device": str(device),
        "train_images_per_s": args.batch / train_s, "ms_per_step": 1e3 * train_s,
        "samples_per_s": args.batch * args.samples / sample_s,
        "peak_mib": peak, "peak_kind": "cuda_max_allocated" if device.type == "cuda" else "rss",
        "threads": torch.get_num_threads(),
        "cpu": onednn_isa(),
    }))


if __name__ == "__main__":
    main()
