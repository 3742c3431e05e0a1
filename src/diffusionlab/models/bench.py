"""Time one training step (forward, backward, AdamW) of a network: ``python -m diffusionlab.models.bench``.

Prints the median and minimum wall time per step and the process CPU time per step (on a shared, busy machine
the CPU time is the steadier number; with ``--threads 1`` it is what an idle core would take).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from diffusionlab.models.builder import DIGITS_UNET, build_network, count_parameters


def time_training_step(cfg: dict, sample_shape: tuple[int, ...], batch: int = 128, steps: int = 10,
                       warmup: int = 3, device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """Median / min wall ms and median CPU ms of ``steps`` AdamW training steps on random data."""
    torch.manual_seed(seed)
    net = build_network(cfg, sample_shape, device=device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch, *sample_shape, device=device)
    c = 1000 * torch.rand(batch, device=device)

    def step():
        loss = (net(x, c) - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(steps):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        wall.append(1000 * (time.perf_counter() - w0))
        cpu.append(1000 * (time.process_time() - c0))
    return {"params": count_parameters(net), "wall_ms_median": statistics.median(wall), "wall_ms_min": min(wall),
            "cpu_ms_median": statistics.median(cpu), "threads": torch.get_num_threads()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=json.dumps(DIGITS_UNET), help="network config as JSON")
    ap.add_argument("--shape", default="1,8,8", help="sample shape, comma separated")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    print(json.dumps(time_training_step(json.loads(args.config), shape, args.batch, args.steps, device=args.device)))


if __name__ == "__main__":
    main()
