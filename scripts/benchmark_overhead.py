"""Measure what SampleCountRescaler costs against naive Lightning accumulation, side by side in one run.

Prints ratios to naive accumulation of the wall time per optimizer step of whole ``Trainer.fit`` runs, for
both modes (deferred rescale and look-ahead); the time of the fused gradient rescale relative to one
``SGD.step`` on the same parameters; the bytes the rescale allocates (torch profiler) against the gradients'
bytes; and the host memory that look-ahead holds (K-1 micro-batches).

    python scripts/benchmark_overhead.py            # about a minute on 2 CPU cores
    python scripts/benchmark_overhead.py --device cuda --hidden 2048
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader

from lightning_accum import SampleCountMixin, SampleCountRescaler
from lightning_accum.scaling import scale_gradients_


def token_batches(n: int, batch: int, tokens: int, features: int, seed: int) -> list[tuple]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(batch, tokens, features, generator=gen)
        y = torch.randint(0, 10, (batch, tokens), generator=gen)
        lengths = torch.randint(1, tokens + 1, (batch, 1), generator=gen)
        out.append((x, y, torch.arange(tokens) < lengths))
    return out


class Net(pl.LightningModule):
    def __init__(self, batches: list[tuple], features: int, hidden: int) -> None:
        super().__init__()
        self.batches = batches
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, 10))  # fmt: skip

    def token_losses(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, mask = batch
        return F.cross_entropy(self.net(x).transpose(1, 2), y, reduction="none"), mask

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class NaiveNet(Net):
    """What users write today: the micro-batch mean, logged in ``training_step`` (the rescaler logs its own)."""

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        losses, mask = self.token_losses(batch)
        loss = (losses * mask).sum() / mask.sum()
        self.log("train/loss", loss)
        return loss


class ExactNet(SampleCountMixin, Net):
    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        losses, mask = self.token_losses(batch)
        return self.sample_loss(losses, mask)

    def count_items(self, batch: tuple) -> torch.Tensor:
        return batch[2].sum()


MODES = ("naive", "deferred", "lookahead")


def seconds_per_step(mode: str, args: argparse.Namespace, batches: list[tuple]) -> float:
    module = (NaiveNet if mode == "naive" else ExactNet)(batches, args.features, args.hidden)
    trainer = pl.Trainer(
        accelerator=args.device, devices=1, max_epochs=1, accumulate_grad_batches=args.k,
        callbacks=[] if mode == "naive" else [SampleCountRescaler(mode=mode)], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / trainer.global_step


def rescale_vs_optimizer_step(args: argparse.Namespace) -> tuple[float, float]:
    """Median seconds of one fused rescale and of one SGD-with-momentum step over the same gradients."""
    net = Net([], args.features, args.hidden).to(args.device)
    params = list(net.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    factor = torch.tensor(1.0, device=args.device)

    def timed(fn) -> float:
        samples = []
        for _ in range(args.repeats * 20):
            start = time.perf_counter()
            fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    grads = [p.grad for p in params]
    return timed(lambda: scale_gradients_(grads, factor)), timed(optimizer.step)


def rescale_allocated_bytes(args: argparse.Namespace) -> tuple[int, int]:
    """Bytes the fused rescale allocates (torch profiler), and the bytes of the gradients it scales."""
    grads = [torch.randn_like(p) for p in Net([], args.features, args.hidden).to(args.device).parameters()]
    factor = torch.tensor(0.5, device=args.device)
    activities = [ProfilerActivity.CUDA if args.device == "cuda" else ProfilerActivity.CPU]
    with profile(activities=activities, profile_memory=True) as prof:
        scale_gradients_(grads, factor)
    allocated = sum(max(e.self_device_memory_usage if args.device == "cuda" else e.self_cpu_memory_usage, 0)
                    for e in prof.key_averages())  # fmt: skip
    return allocated, sum(g.numel() * g.element_size() for g in grads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="alternating naive/exact fits per mode")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.manual_seed(0)
    batches = token_batches(args.batches, args.batch, args.tokens, args.features, seed=0)
    for mode in MODES:  # warm up every code path once
        seconds_per_step(mode, args, batches[:8])
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):  # alternate, so that load drifts hit every mode alike
        for mode in MODES:
            times[mode].append(seconds_per_step(mode, args, batches))
    median = {mode: statistics.median(samples) for mode, samples in times.items()}
    params = sum(p.numel() for p in Net([], args.features, args.hidden).parameters())
    rescale, sgd = rescale_vs_optimizer_step(args)
    allocated, grad_bytes = rescale_allocated_bytes(args)
    batch_bytes = sum(t.numel() * t.element_size() for t in batches[0])
    print(f"device={args.device} params={params:,} K={args.k} micro-batch={args.batch}x{args.tokens} tokens")
    for mode in MODES:
        print(f"{mode:<9} fit: {median[mode] * 1e3:8.2f} ms per optimizer step (median of {args.repeats})")
    for mode in MODES[1:]:
        print(f"ratio {mode}/naive time per step: {median[mode] / median['naive']:.3f}")
    print(f"fused rescale {rescale * 1e6:.1f} us vs SGD step {sgd * 1e6:.1f} us: ratio {rescale / sgd:.3f}")
    print(f"rescale allocates {allocated} bytes for {grad_bytes:,} bytes of gradients ({allocated / grad_bytes:.1e})")
    print(f"look-ahead holds K-1 = {args.k - 1} micro-batches: {(args.k - 1) * batch_bytes:,} bytes of host memory")


if __name__ == "__main__":
    main()
