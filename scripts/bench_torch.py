"""The PyTorch side of `probunet bench`: the same model (scripts/torch_probunet.py), the
same synthetic 128x128 data and the same protocol, for one setting, printed as one JSON
line.

    bench_torch.py --batch B --precision fp32|bf16 --device cpu|cuda[:N] --steps S
                   --warmup W --samples N [--compile] [--threads T]

Training: forward, ELBO, backward and an Adam step per batch (the seed's loop as written,
with the loss read back every step as the seed's logging does). Sampling: prior and U-Net
once per image, fcomb per sample, thresholded, `samples` per image.
"""
import argparse
import json
import resource
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from torch_probunet import ProbUNet  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = ProbUNet().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    bf16 = args.precision == "bf16"
    if bf16 and device.type == "cuda":
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
    start = time.perf_counter()
    for _ in range(args.steps):
        train()
    sync(device)
    train_s = (time.perf_counter() - start) / args.steps

    @torch.no_grad()
    def sample():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model.sample(image, args.samples)
        return (logits.float().sigmoid() > 0.5).sum()

    sample()
    sync(device)
    start = time.perf_counter()
    reps = max(1, args.steps // 2)
    for _ in range(reps):
        sample()
    sync(device)
    sample_s = (time.perf_counter() - start) / reps

    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({
        "impl": "pytorch" + ("+compile" if args.compile else ""),
        "batch": args.batch, "precision": args.precision, "device": str(device),
        "train_images_per_s": args.batch / train_s, "ms_per_step": 1e3 * train_s,
        "samples_per_s": args.batch * args.samples / sample_s,
        "peak_mib": peak, "peak_kind": "cuda_max_allocated" if device.type == "cuda" else "rss",
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
