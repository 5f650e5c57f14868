"""Measure what SampleCountRescaler costs against naive Lightning accumulation, side by side in one run.

Prints ratios (exact / naive) of the wall time per optimizer step of whole ``Trainer.fit`` runs, and the
time of the fused gradient rescale relative to one ``SGD.step`` on the same parameters.

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
    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        losses, mask = self.token_losses(batch)
        return (losses * mask).sum() / mask.sum()


class ExactNet(SampleCountMixin, Net):
    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        losses, mask = self.token_losses(batch)
        return self.sample_loss(losses, mask)


def seconds_per_step(exact: bool, args: argparse.Namespace, batches: list[tuple]) -> float:
    module = (ExactNet if exact else NaiveNet)(batches, args.features, args.hidden)
    trainer = pl.Trainer(
        accelerator=args.device, devices=1, max_epochs=1, accumulate_grad_batches=args.k,
        callbacks=[SampleCountRescaler()] if exact else [], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
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
    seconds_per_step(True, args, batches[:8])  # warm up both code paths once
    seconds_per_step(False, args, batches[:8])
    naive, exact = [], []
    for _ in range(args.repeats):
        naive.append(seconds_per_step(False, args, batches))
        exact.append(seconds_per_step(True, args, batches))
    params = sum(p.numel() for p in Net([], args.features, args.hidden).parameters())
    rescale, sgd = rescale_vs_optimizer_step(args)
    print(f"device={args.device} params={params:,} K={args.k} micro-batch={args.batch}x{args.tokens} tokens")
    print(f"naive  fit: {statistics.median(naive) * 1e3:8.2f} ms per optimizer step (median of {args.repeats})")
    print(f"exact  fit: {statistics.median(exact) * 1e3:8.2f} ms per optimizer step (median of {args.repeats})")
    print(f"ratio exact/naive time per step: {statistics.median(exact) / statistics.median(naive):.3f}")
    print(f"fused rescale {rescale * 1e6:.1f} us vs SGD step {sgd * 1e6:.1f} us: ratio {rescale / sgd:.3f}")


if __name__ == "__main__":
    main()
