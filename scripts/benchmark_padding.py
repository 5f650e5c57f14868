"""Padding-free micro-batches that keep the trajectory: length grouping inside fixed windows vs Hugging Face's.

Trains the demo ``CausalLM`` exactly (``SampleCountRescaler``) on real text (stdlib docstrings cut into pieces of
log-normal length: many short, few long) in one process, five ways, side by side in one run:

- ``ungrouped``: ``GlobalBatchSampler`` (each micro-batch a random slice of its window);
- ``grouped``: ``GlobalBatchSampler(lengths=...)``, the same windows cut into length-sorted micro-batches of
  ``B`` samples;
- ``grouped+budget``: the same with ``max_tokens`` (default ``B`` x the longest sample: the ungrouped worst
  case), micro-batches of any number of samples;
- ``hf``: Hugging Face's ``group_by_length`` order (``transformers.trainer_pt_utils.get_length_grouped_indices``,
  reimplemented below from its documented logic since transformers is not installed here): the epoch's
  permutation cut into megabatches of ``min(n // (4 * batch), 50) * batch`` samples, each sorted by length,
  longest first, the longest of all moved to the front; ``batch`` is ``B * K``, as the Trainer passes it;
- ``packed``: ``ungrouped``'s micro-batches packed several samples per row (``demos.PackCollate``, rows of at most
  ``--row-length`` targets, default the longest sample). The GRU reads a packed row as one sequence: its state
  runs on from one sample into the next (a recurrent model has no document-isolated attention), so this row
  measures the padding and the speed of packing, not the same trajectory; ``tests/test_packing.py`` shows the
  same trajectory with the attention LM ``demos.AttentionLM``, which isolates documents.

For each it prints the padded-token fraction, the median wall time of a Lightning epoch, the compute time of one
epoch's micro-batches (forward and backward, the four ways interleaved round by round so that a change of machine
load hits all alike), real (unpadded) tokens per compute second and its ratio to ``ungrouped``, and the final
parameters' distance to the ``ungrouped`` run relative to its update
(``|theta - theta_ungrouped| / |theta_ungrouped - theta_0|``): rounding only for the grouped runs, a different
trajectory for ``hf``. Timings are of this machine: compare them on a quiet one.

    python scripts/benchmark_padding.py                        # about 75 s on 2 CPU cores
    python scripts/benchmark_padding.py --plot padding.png     # also the padded fraction per optimizer step
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from lightning_accum import GlobalBatchLoader, GlobalBatchSampler, SampleCountRescaler
from lightning_accum.data.sampler import EpochPermutation
from lightning_accum.demos import CausalLM
from lightning_accum.demos.collate import PadCollate
from lightning_accum.demos.datasets import TokenSequenceDataset
from lightning_accum.demos.packing import PackCollate
from lightning_accum.demos.text import CharVocab, stdlib_docstring_lines


def text_pieces(count: int, median: float, sigma: float, longest: int, seed: int) -> list[str]:
    """``count`` consecutive pieces of the stdlib docstrings with ``exp(N(log median, sigma))`` characters.

    Examples:
        >>> pieces = text_pieces(50, median=20, sigma=1.0, longest=200, seed=0)
        >>> len(pieces), max(map(len, pieces)) <= 200, min(map(len, pieces)) >= 2
        (50, True, True)
    """
    text = " ".join(stdlib_docstring_lines(min_chars=1))
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.exp(torch.randn(count, generator=gen) * sigma + math.log(median)).round().clamp(2, longest).long()
    pieces, start = [], 0
    for size in sizes.tolist():
        if start + size > len(text):
            start = 0
        pieces.append(text[start : start + size])
        start += size
    return pieces


def hf_megabatch_multiple(samples: int, batch_size: int) -> int:
    """Hugging Face's default ``mega_batch_mult``: ``min(samples // (4 * batch_size), 50)``, at least 1."""
    return max(1, min(samples // (batch_size * 4), 50))


def hf_length_grouped_indices(order: Sequence[int], lengths: Sequence[int], batch_size: int) -> list[int]:
    """Hugging Face's ``get_length_grouped_indices`` on a given permutation ``order`` (its ``randperm``).

    Examples:
        >>> hf_length_grouped_indices([0, 1, 2, 3, 4, 5], [1, 5, 2, 9, 3, 4], batch_size=1)  # megabatches of 1
        [3, 1, 2, 0, 4, 5]
    """
    size = hf_megabatch_multiple(len(lengths), batch_size) * batch_size
    megabatches = [
        sorted(order[i : i + size], key=lambda i: lengths[i], reverse=True) for i in range(0, len(order), size)
    ]
    longest = max(range(len(megabatches)), key=lambda m: lengths[megabatches[m][0]])
    megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    return [i for megabatch in megabatches for i in megabatch]


class HFLengthGroupedBatches(Sampler[list[int]]):
    """Micro-batches of ``batch`` consecutive indices of ``hf_length_grouped_indices`` over ``EpochPermutation``."""

    def __init__(self, lengths: Sequence[int], micro_batch_size: int, accumulate_grad_batches: int, seed: int) -> None:
        self.lengths, self.micro_batch_size = list(lengths), micro_batch_size
        self.batch_size = micro_batch_size * accumulate_grad_batches
        self.sampler = EpochPermutation(len(lengths), seed=seed)  # Lightning calls its set_epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = hf_length_grouped_indices(self.sampler.indices(), self.lengths, self.batch_size)
        for start in range(0, len(order), self.micro_batch_size):
            yield order[start : start + self.micro_batch_size]

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.micro_batch_size)


class MeasuredLM(CausalLM):
    """``CausalLM`` on a given loader that records, per optimizer step, padded slots, real target tokens and the
    sum of the micro-batches' widths (time steps the GRU runs one after another)."""

    def __init__(self, loader: DataLoader, vocab_size: int) -> None:
        super().__init__(vocab_size)
        self.loader = loader
        self.per_step: dict[int, list[int]] = {}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        record = self.per_step.setdefault(self.trainer.global_step, [0, 0, 0])
        record[0] += batch["mask"][batch["valid"]].numel()
        record[1] += int(self.loss_mask(batch).sum())
        record[2] += batch["mask"].shape[1]
        return super().training_step(batch, batch_idx)

    def train_dataloader(self) -> DataLoader:
        return self.loader


class EpochTimer(pl.Callback):
    """Wall seconds of every training epoch."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self.start)


def make_loader(name: str, data: TokenSequenceDataset, args: argparse.Namespace) -> DataLoader:
    """The training loader of one way of cutting the epoch into micro-batches."""
    lengths, b, k = data.lengths(), args.micro_batch_size, args.accumulate
    if name == "hf":
        return DataLoader(
            data, batch_sampler=HFLengthGroupedBatches(lengths, b, k, args.seed), collate_fn=PadCollate(0)
        )
    grouping = {"grouped": {"lengths": lengths}, "grouped+budget": {"lengths": lengths, "max_tokens": args.max_tokens}}
    sampler = GlobalBatchSampler(len(data), b, k, seed=args.seed, **grouping.get(name, {}))
    collate = PackCollate(0, args.row_length) if name == "packed" else PadCollate(0)
    return GlobalBatchLoader(data, sampler, collate_fn=collate)


def run(name: str, data: TokenSequenceDataset, vocab_size: int, args: argparse.Namespace) -> dict:
    """Fit one way; return its per-epoch seconds, per-step padding records and final parameters."""
    torch.manual_seed(args.seed)
    module = MeasuredLM(make_loader(name, data, args), vocab_size)
    initial = torch.cat([p.detach().flatten().clone() for p in module.parameters()])
    timer = EpochTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        accumulate_grad_batches=args.accumulate,
        use_distributed_sampler=False,
        callbacks=[SampleCountRescaler(), timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    final = torch.cat([p.detach().flatten() for p in module.parameters()])
    return {
        "seconds": sorted(timer.seconds)[len(timer.seconds) // 2],  # the median epoch
        "steps": [module.per_step[s] for s in sorted(module.per_step)],
        "initial": initial,
        "final": final,
    }


def compute_seconds(names: list[str], data: TokenSequenceDataset, vocab_size: int, args: argparse.Namespace) -> dict:
    """Forward and backward over each way's first-epoch micro-batches, the ways interleaved round by round.

    Interleaving spreads a change of machine load over all ways alike; the least of ``args.rounds`` rounds is
    the pass least disturbed. This is the compute that the cut into micro-batches changes, without Lightning.
    """
    epochs = {name: list(make_loader(name, data, args)) for name in names}
    torch.manual_seed(args.seed)
    model = CausalLM(vocab_size)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, batches in epochs.items():
            start = time.perf_counter()
            for batch in batches:
                losses, mask = model.token_losses(batch)
                losses[mask].sum().backward()
            seconds[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--median-chars", type=float, default=24.0)
    parser.add_argument("--sigma", type=float, default=1.0, help="log-normal spread of the lengths")
    parser.add_argument("--longest", type=int, default=256, help="pieces are cut to at most this many characters")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--accumulate", type=int, default=8, help="K micro-batches per optimizer step")
    parser.add_argument("--max-tokens", type=int, default=None, help="grouped+budget's budget; default B x longest")
    parser.add_argument("--row-length", type=int, default=None, help="packed's row length; default the longest")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the least is printed)")
    parser.add_argument("--plot", default=None, help="save the padded fraction per optimizer step to this PNG")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    pieces = text_pieces(args.samples, args.median_chars, args.sigma, args.longest, args.seed)
    vocab = CharVocab(pieces)
    data = TokenSequenceDataset([vocab.encode(piece, args.longest) for piece in pieces], vocab.pad_id)
    lengths = data.lengths()
    if args.max_tokens is None:
        args.max_tokens = args.micro_batch_size * max(lengths)
    if args.row_length is None:
        args.row_length = max(lengths)
    quantiles = torch.tensor(lengths, dtype=torch.float).quantile(torch.tensor([0.5, 0.9, 0.99])).tolist()
    b, k = args.micro_batch_size, args.accumulate
    multiple = hf_megabatch_multiple(len(lengths), b * k)
    print(
        f"{len(lengths)} pieces of stdlib docstrings; target tokens per piece: median {quantiles[0]:.0f}, "
        f"p90 {quantiles[1]:.0f}, p99 {quantiles[2]:.0f}, max {max(lengths)}\n"
        f"1 process, K={k} x B={b} (E={k * b} samples per optimizer step), {args.epochs} epochs, exact weighting, "
        f"AdamW; grouped+budget: max_tokens={args.max_tokens}; hf: megabatches of {multiple} x {b * k} samples"
    )
    names = ["ungrouped", "grouped", "grouped+budget", "hf", "packed"]
    results = {name: run(name, data, len(vocab), args) for name in names}
    base = results["ungrouped"]
    update = (base["final"] - base["initial"]).norm()
    compute = compute_seconds(names, data, len(vocab), args)
    print(
        f"{'run':<16}{'padded':>8}{'GRU steps':>11}{'fit s/epoch':>13}{'compute s/epoch':>17}{'tokens/s':>10}"
        f"{'vs ungrouped':>14}{'distance to ungrouped':>23}"
    )
    for name, result in results.items():
        slots, real, widths = (sum(column) for column in zip(*result["steps"], strict=True))
        rate = real / args.epochs / compute[name]
        distance = float((result["final"] - base["final"]).norm() / update)
        print(
            f"{name:<16}{1 - real / slots:>8.1%}{widths // args.epochs:>11}{result['seconds']:>13.2f}"
            f"{compute[name]:>17.2f}{rate:>10.0f}{compute['ungrouped'] / compute[name]:>13.2f}x{distance:>23.2e}"
        )
    print(
        "padded: padded share of the micro-batches' tokens; GRU steps: their widths summed per epoch, the sequential "
        "steps a GRU runs (on CPU a small GRU's time follows them more than padded tokens: a budget packs short "
        "samples densely but spreads long ones over more micro-batches); fit s/epoch: median Lightning epoch; "
        f"compute s/epoch: forward+backward of one epoch's micro-batches, least of {args.rounds} interleaved rounds; "
        "tokens/s: real target tokens per compute second (every way trains all tokens, so its ratio is the inverse "
        "ratio of compute seconds); distance: |theta - theta_ungrouped| / |theta_ungrouped - "
        f"theta_0| after the exact fits. packed: rows of at most {args.row_length} targets; the GRU's state runs "
        "across the packed samples of a row, so its distance is that of another model, not of rounding."
    )
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")


def plot(results: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    for name, result in results.items():
        axis.plot([1 - real / slots for slots, real, _ in result["steps"]], label=name)
    axis.set(xlabel="optimizer step", ylabel="padded fraction of the step's tokens", ylim=(0, 1))
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
