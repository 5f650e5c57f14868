"""What SampleCountRescaler costs against naive Lightning accumulation, measured where users run, in one run.

Fits the demo ``CausalLM`` (a stacked GRU next-token model, a few million parameters on the CPU) on
variable-length padded token sequences with K = 8, with naive accumulation (the user's usual micro-batch
mean loss, logged in ``training_step``), the default (deferred) mode, look-ahead mode and the default mode with
``GradientNoiseScale`` beside it (``deferred+noise``), in one process
and on 2 DDP ranks (gloo on the CPU). Every fit runs in a fresh process; modes alternate within every
repeat, in a rotating order, so that load drifts hit every mode alike. At the end one table gives, per
configuration and mode, the time per optimizer step (steady state: the fit's first steps and its start-up
are not timed) and the peak memory per rank, each as a ratio to naive of the same repeat (median and
[min, max] over repeats), then the bandwidth the fused gradient rescale reaches against a ``torch`` copy
of the same number of bytes, measured in the same run. It prints figures and never judges them.

    python scripts/benchmark_overhead.py              # CPU, 2.5M parameters, 5 repeats: ~10 minutes on 2 cores
    python scripts/benchmark_overhead.py --threads 1  # the same, 1 torch thread per rank (for busy cores)
    python scripts/benchmark_overhead.py --quick      # tiny sizes, 1 repeat: a smoke check (1-2 minutes)
    python scripts/benchmark_overhead.py --device cuda --ranks 1 2   # ~94M parameters, bf16-mixed, 1 and 2 GPUs
    python scripts/benchmark_overhead.py --modes deferred deferred+noise   # GradientNoiseScale's cost alone

How it measures:

- Time per optimizer step: a callback reads the clock at the end of step ``--warmup`` and of step
  ``--warmup + --steps`` (after a ``torch.cuda.synchronize()`` on a GPU, the only two syncs it adds) and
  divides by ``--steps``; the slowest rank counts. Ratios pair each mode with the naive fit of the same repeat;
  every fit of every mode sees the same batches in the same order. "fastest / fastest" divides the fastest fit
  of a mode by the fastest naive fit: other load only ever adds time, so on a busy machine it is the steadier
  figure. ``--threads 1`` avoids the thread contention that makes a 2-thread process crawl on busy cores.
- Peak memory per rank: each fit runs in a fresh process (and ``strategy="ddp"`` starts its second rank
  as a fresh process too), so each rank's high-water resident set size (``ru_maxrss``) belongs to that
  fit alone; on a GPU, ``torch.cuda.max_memory_allocated``. The constant offset is the high-water RSS
  just before ``fit`` (Python, torch, Lightning, model and data); ``+MiB`` is the difference to naive.
- ``strategy="ddp"``, not ``ddp_spawn``: both ranks run this same script from the start, as users launch
  DDP, so the ranks are alike and neither holds the pickled module or the launcher's state; the steady-state
  steps are the same DDP code either way.
- Bandwidth: bytes read plus written per second (2x the gradients' bytes per call) by ``scale_gradients_``
  over float32 gradients shaped like the model's parameters, against ``dst.copy_(src)`` of one flat tensor of
  the same bytes (the machine's copy bandwidth) and ``flat.mul_(factor)`` of it (the same in-place traffic in
  one kernel), calls alternated, 50 of each after every repeat's fits. A copy touches twice the distinct
  memory of an in-place multiply, so where the gradients fit in the last-level cache the ratio to the copy
  can exceed 1; the ratio to the flat multiply isolates what splitting into tensors costs.
- ``GradientNoiseScale``: with ``deferred`` and ``deferred+noise`` both run, a line gives the time per step with
  the callback over without it, paired within each repeat (the two fits run one right after the other, in
  alternating order), and the fastest over the fastest. The load average (1 minute) is printed at the start and
  the end of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader

from lightning_accum import GradientNoiseScale, SampleCountRescaler
from lightning_accum.demos import CausalLM
from lightning_accum.demos.collate import PadCollate
from lightning_accum.demos.datasets import TokenSequenceDataset
from lightning_accum.scaling import scale_gradients_  # the one import that may move with the library's layout

MODES = ("naive", "deferred", "lookahead", "deferred+noise")  # the last: deferred with GradientNoiseScale
MIB = 2**20
Results = dict[tuple[int, str], list[dict[str, float]]]  # (ranks, mode) -> one dict of figures per repeat


@dataclass(frozen=True)
class Size:
    """The model, the data and the number of steps of every fit."""

    vocab: int
    embed: int
    hidden: int
    layers: int
    micro_batch: int  # sequences per micro-batch and rank
    min_len: int  # tokens per sequence, uniform in [min_len, max_len]
    max_len: int
    k: int
    warmup: int  # optimizer steps not timed
    steps: int  # optimizer steps timed
    precision: str


PRESETS = {
    "cpu": Size(256, 128, 384, 3, 4, 8, 64, 8, 2, 4, "32-true"),
    "cuda": Size(16384, 1024, 2048, 2, 16, 64, 512, 8, 3, 10, "bf16-mixed"),
    "quick": Size(32, 16, 32, 2, 2, 3, 12, 8, 1, 2, "32-true"),
}


class NaiveLM(CausalLM):
    """What users write today: the micro-batch's mean token loss, logged in ``training_step``.

    Not ``demos.naive.NaiveCausalLM``: that one all-reduces the window's global loss at every step for
    plotting, a cost the user's naive run does not pay.
    """

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        losses, mask = self.token_losses(batch)
        loss = torch.where(mask, losses, 0.0).sum() / mask.sum()  # not losses[mask]: no host sync on a GPU
        self.log("train/loss", loss)
        return loss


class StepClock(Callback):
    """Reads the clock after optimizer steps ``warmup`` and ``warmup + steps``, and the peak memory at the end."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.start: float | None = None
        self.stop: float | None = None
        self.peak_device_bytes = 0

    def _now(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if self.start is None and trainer.global_step == self.warmup:
            self.start = self._now(pl_module.device)
        elif self.stop is None and trainer.global_step == self.warmup + self.steps:
            self.stop = self._now(pl_module.device)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            self.peak_device_bytes = torch.cuda.max_memory_allocated(pl_module.device)

    def seconds_per_step(self) -> float:
        if self.start is None or self.stop is None:
            raise RuntimeError(f"the fit ended before optimizer step {self.warmup + self.steps}.")
        return (self.stop - self.start) / self.steps


def peak_rss_bytes() -> int:
    """This process's high-water resident set size (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def token_sequences(size: Size, count: int, seed: int = 0) -> TokenSequenceDataset:
    """``count`` sequences of random token ids (never the pad id 0) and uniform random lengths."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(size.min_len, size.max_len + 1, (count,), generator=gen)
    return TokenSequenceDataset([torch.randint(1, size.vocab, (int(n),), generator=gen) for n in lengths], pad_id=0)


def build_model(mode: str, size: Size) -> CausalLM:
    torch.manual_seed(0)  # the same initial parameters in every mode
    cls = NaiveLM if mode == "naive" else CausalLM
    return cls(vocab_size=size.vocab, pad_id=0, embed_dim=size.embed, hidden_size=size.hidden, num_layers=size.layers)


def fit_once(mode: str, ranks: int, device: str, size: Size) -> dict[str, float]:
    """Fit ``warmup + steps`` optimizer steps here (under DDP, with the rank it starts); this rank's figures."""
    batches = (size.warmup + size.steps) * size.k
    loader = DataLoader(token_sequences(size, batches * size.micro_batch * ranks), size.micro_batch,
                        collate_fn=PadCollate(pad_id=0))  # fmt: skip
    model = build_model(mode, size)
    clock = StepClock(size.warmup, size.steps)
    callbacks: list[Callback] = [clock]
    if mode != "naive":
        callbacks.append(SampleCountRescaler(mode=mode.removesuffix("+noise")))
    if mode.endswith("+noise"):
        callbacks.append(GradientNoiseScale())
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=ranks, strategy="ddp" if ranks > 1 else "auto",
        precision=size.precision, max_epochs=1, limit_train_batches=batches, limit_val_batches=0,
        accumulate_grad_batches=size.k, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    before_fit = peak_rss_bytes()
    trainer.fit(model, train_dataloaders=loader)
    return {
        "rank": trainer.global_rank,
        "seconds_per_step": clock.seconds_per_step(),
        "peak_bytes": clock.peak_device_bytes or peak_rss_bytes(),
        "offset_bytes": 0 if clock.peak_device_bytes else before_fit,
        "threads": torch.get_num_threads(),
    }


def run_worker(args: argparse.Namespace, size: Size) -> None:
    """Entry point of a fit's process (and of the DDP rank it relaunches): write this rank's figures as JSON."""
    warnings.filterwarnings("ignore")
    figures = fit_once(args.worker_mode, args.worker_ranks, args.device, size)
    Path(f"{args.worker_out}.rank{figures['rank']}.json").write_text(json.dumps(figures))


def fit_in_fresh_process(
    argv: Sequence[str], mode: str, ranks: int, threads: int | None, out_dir: Path, tag: str
) -> dict[str, float]:
    """Run one fit in a new Python process; the slowest rank's time and the largest rank's memory.

    ``threads`` sets ``OMP_NUM_THREADS`` (torch's intra-op threads per rank); ``None`` keeps the defaults:
    all cores in one process, cores / ranks under DDP (Lightning sets that).
    """
    out = out_dir / tag
    command = [sys.executable, os.path.abspath(__file__), *argv, "--worker-mode", mode, "--worker-ranks",
               str(ranks), "--worker-out", str(out)]  # fmt: skip
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the {mode} fit on {ranks} rank(s) failed:\n{done.stderr[-4000:]}")
    per_rank = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(ranks)]
    keys = ("seconds_per_step", "peak_bytes", "offset_bytes", "threads")
    return {key: max(figures[key] for figures in per_rank) for key in keys}


def gradients_like(size: Size, device: str) -> list[Tensor]:
    """Random float32 gradients shaped like the model's parameters (mixed precision keeps them float32)."""
    return [torch.randn_like(p) for p in build_model("deferred", size).to(device).parameters()]


def timed(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


OPS = {  # what bandwidth_seconds times, and how the table names it
    "rescale": "fused rescale (scale_gradients_ over the gradient tensors)",
    "copy": "torch copy (dst.copy_(src), one tensor)",
    "flat mul_": "in-place multiply of one flat tensor",
}


def bandwidth_seconds(grads: list[Tensor], device: str, calls: int) -> dict[str, list[float]]:
    """Seconds per call, alternated ``calls`` times: the fused rescale of ``grads``; ``dst.copy_(src)`` of one flat
    tensor of the same bytes (the machine's copy bandwidth); ``flat.mul_(factor)`` of one flat tensor of the same
    bytes (the same in-place traffic in one contiguous kernel: the best the rescale could do)."""
    src = torch.randn(sum(g.numel() for g in grads), device=device)
    dst = torch.empty_like(src)
    factors = [torch.tensor(2.0, device=device), torch.tensor(0.5, device=device)]  # values stay where they were
    seconds: dict[str, list[float]] = {op: [] for op in OPS}
    for call in range(calls):
        factor = factors[call % 2]
        seconds["rescale"].append(timed(lambda factor=factor: scale_gradients_(grads, factor), device))
        seconds["copy"].append(timed(lambda: dst.copy_(src), device))
        seconds["flat mul_"].append(timed(lambda factor=factor: src.mul_(factor), device))
    return seconds


def rescale_allocated_bytes(grads: list[Tensor], device: str) -> int:
    """Bytes the fused rescale allocates, by the torch profiler (0: it works in place)."""
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    factor = torch.tensor(1.0, device=device)
    with profile(activities=[activity], profile_memory=True) as prof:
        scale_gradients_(grads, factor)
    usage = "self_device_memory_usage" if device == "cuda" else "self_cpu_memory_usage"
    return sum(max(getattr(event, usage), 0) for event in prof.key_averages())


def lookahead_held_bytes(size: Size) -> int:
    """Bytes of the K-1 micro-batches look-ahead reads ahead, for micro-batches of mean length."""
    loader = DataLoader(token_sequences(size, 64 * size.micro_batch), size.micro_batch, collate_fn=PadCollate(0))
    mean = statistics.mean(sum(t.numel() * t.element_size() for t in batch.values()) for batch in loader)
    return int((size.k - 1) * mean)


def spread(values: Sequence[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"


def config_name(ranks: int, device: str) -> str:
    return "1 process" if ranks == 1 else f"{ranks} DDP ranks" + (" (gloo)" if device == "cpu" else "")


COLUMNS = ("config", "mode", "ms per step", "time / naive", "fastest / fastest", "peak MiB per rank", "memory / naive",
           "+MiB vs naive")  # fmt: skip
WIDTHS = (20, 10, 26, 24, 18, 26, 24, 14)


def print_row(cells: Sequence[str]) -> None:
    print(" ".join(f"{cell:<{width}}" for cell, width in zip(cells, WIDTHS, strict=True)).rstrip())


def mode_row(name: str, mode: str, runs: list[dict[str, float]], naive: list[dict[str, float]]) -> list[str]:
    """One table row: medians and [min, max] over repeats, ratios paired with the same repeat's naive fit; and
    the fastest fit over the fastest naive fit (load only ever adds time, so on a busy machine this is the
    steadier estimate)."""
    pairs = list(zip(runs, naive, strict=True))
    time_ratio = [r["seconds_per_step"] / n["seconds_per_step"] for r, n in pairs]
    memory_ratio = [r["peak_bytes"] / n["peak_bytes"] for r, n in pairs]
    extra = statistics.median((r["peak_bytes"] - n["peak_bytes"]) / MIB for r, n in pairs)
    fastest = min(r["seconds_per_step"] for r in runs) / min(n["seconds_per_step"] for n in naive)
    return [
        name,
        mode,
        spread([r["seconds_per_step"] * 1e3 for r in runs], ".1f"),
        spread(time_ratio, ".3f"),
        f"{fastest:.3f}",
        spread([r["peak_bytes"] / MIB for r in runs], ".1f"),
        spread(memory_ratio, ".3f"),
        f"{extra:+.1f}",
    ]


def print_table(results: Results, ranks_list: Sequence[int], device: str, modes: Sequence[str]) -> None:
    memory = "torch.cuda.max_memory_allocated" if device == "cuda" else "peak RSS (ru_maxrss)"
    print(f"\nmedian [min, max] over repeats; memory is {memory}; ratios pair each fit with its repeat's naive fit")
    print_row(COLUMNS)
    for ranks in ranks_list:
        for mode in modes:
            print_row(mode_row(config_name(ranks, device), mode, results[(ranks, mode)], results[(ranks, "naive")]))
    naive = {ranks: results[(ranks, "naive")] for ranks in ranks_list}
    threads = [f"{config_name(r, device)} {runs[0]['threads']}" for r, runs in naive.items()]
    print("torch threads per rank: " + ", ".join(threads))
    if device == "cpu":
        offsets = [f"{config_name(r, device)} {statistics.median(n['offset_bytes'] for n in runs) / MIB:.1f} MiB"
                   for r, runs in naive.items()]  # fmt: skip
        print("constant offset, RSS per rank before fit (Python, torch, Lightning, model, data): " + ", ".join(offsets))


def print_noise_overhead(results: Results, ranks_list: Sequence[int], device: str) -> None:
    """Time per step with ``GradientNoiseScale`` over without it (the default mode both), paired per repeat."""
    for ranks in ranks_list:
        pairs = list(zip(results[(ranks, "deferred+noise")], results[(ranks, "deferred")], strict=True))
        ratio = [a["seconds_per_step"] / b["seconds_per_step"] for a, b in pairs]
        fastest = min(a["seconds_per_step"] for a, _ in pairs) / min(b["seconds_per_step"] for _, b in pairs)
        print(f"GradientNoiseScale, {config_name(ranks, device)}: time per step with / without, paired per repeat "
              f"{spread(ratio, '.3f')}, fastest / fastest {fastest:.3f} ({len(pairs)} pairs)")  # fmt: skip


def load_average() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "unknown"


def print_bandwidth(seconds: dict[str, list[float]], grads: list[Tensor], allocated: int) -> None:
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    moved = 2 * grad_bytes  # every byte read once and written once
    median = {op: statistics.median(samples) for op, samples in seconds.items()}
    samples = len(seconds["copy"])
    print(f"\nbandwidth: bytes read + written per second, {len(grads)} gradient tensors of {grad_bytes / MIB:.1f} MiB "
          f"in all and one flat tensor of the same bytes, median of {samples} alternated calls each")  # fmt: skip
    for op in OPS:
        print(f"{OPS[op]:<60} {moved / median[op] / 1e9:8.2f} GB/s  {median[op] * 1e3:8.3f} ms")
    print(f"rescale bandwidth / copy bandwidth: {median['copy'] / median['rescale']:.3f}")
    print(f"rescale bandwidth / flat in-place multiply bandwidth: {median['flat mul_'] / median['rescale']:.3f}")
    print(f"rescale allocates {allocated} bytes (torch profiler) for {grad_bytes:,} bytes of gradients")


def print_rescale_share(
    seconds: dict[str, list[float]], results: Results, ranks_list: Sequence[int], device: str
) -> None:
    """The fused rescale's time (measured above, outside the fits) as a share of a naive optimizer step."""
    rescale = statistics.median(seconds["rescale"])
    naive = {r: statistics.median(n["seconds_per_step"] for n in results[(r, "naive")]) for r in ranks_list}
    shares = [f"{config_name(r, device)} {rescale / step:.2e}" for r, step in naive.items()]
    print("one fused rescale / one naive optimizer step: " + ", ".join(shares))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 1 repeat: a smoke check")
    parser.add_argument("--repeats", type=int, help="fits per configuration and mode (default 5; --quick 1)")
    parser.add_argument(
        "--ranks", type=int, nargs="+", help="configurations: ranks per fit (default: 1 2 on cpu, 1 on cuda)"
    )
    parser.add_argument("--steps", type=int, help="timed optimizer steps per fit (default from the preset)")
    parser.add_argument("--warmup", type=int, help="untimed optimizer steps before them (default from the preset)")
    parser.add_argument("--threads", type=int, help="torch threads per rank (default: torch's and Lightning's)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="the modes to fit (all)")
    parser.add_argument("--worker-mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--worker-ranks", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def chosen_size(args: argparse.Namespace) -> Size:
    size = asdict(PRESETS["quick" if args.quick else args.device])
    if args.device == "cuda":
        size["precision"] = "bf16-mixed"
    size.update({key: getattr(args, key) for key in ("steps", "warmup") if getattr(args, key) is not None})
    if size["warmup"] < 1 or size["steps"] < 1:
        raise SystemExit(f"--warmup and --steps must be >= 1, got {size['warmup']} and {size['steps']}.")
    return Size(**size)


def describe(size: Size, device: str, repeats: int) -> str:
    params = sum(p.numel() for p in build_model("naive", size).parameters())
    return (
        f"device={device} CausalLM GRU {size.layers}x{size.hidden} embed {size.embed} vocab {size.vocab}: "
        f"{params:,} parameters, precision {size.precision}, K={size.k}, micro-batch {size.micro_batch} sequences "
        f"of {size.min_len}-{size.max_len} tokens (padded, masked), {size.steps} steps timed after {size.warmup}, "
        f"{repeats} repeats"
    )


def run_all(
    args: argparse.Namespace, repeats: int, ranks_list: Sequence[int], grads: list[Tensor]
) -> tuple[Results, dict[str, list[float]]]:
    """Every fit, interleaved: per repeat each configuration's modes in a rotating order, then bandwidth samples."""
    modes = tuple(m for m in MODES if m in args.modes)
    results: Results = {(r, m): [] for r in ranks_list for m in modes}
    bandwidth: dict[str, list[float]] = {op: [] for op in OPS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            order = modes[repeat % len(modes) :] + modes[: repeat % len(modes)]  # rotate who goes first
            for ranks in ranks_list:
                for mode in order:
                    tag = f"{repeat}-{ranks}-{mode}"
                    figures = fit_in_fresh_process(sys.argv[1:], mode, ranks, args.threads, Path(tmp), tag)
                    results[(ranks, mode)].append(figures)
                    print(f"repeat {repeat + 1}/{repeats} {config_name(ranks, args.device):<20} {mode:<10} "
                          f"{figures['seconds_per_step'] * 1e3:9.1f} ms/step {figures['peak_bytes'] / MIB:8.1f} MiB "
                          f"{figures['threads']} threads/rank", flush=True)  # fmt: skip
            for op, samples in bandwidth_seconds(grads, args.device, calls=50).items():
                bandwidth[op] += samples
    return results, bandwidth


def main() -> None:
    args = parse_args()
    size = chosen_size(args)
    if args.worker_mode is not None:
        run_worker(args, size)
        return
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)  # the bandwidth measurement in this process too
    repeats = args.repeats or (1 if args.quick else 5)
    ranks_list = args.ranks or ([1, 2] if args.device == "cpu" else [1])
    print(describe(size, args.device, repeats), flush=True)
    print(f"load average (1 min) at the start: {load_average()}, {os.cpu_count()} CPUs", flush=True)
    grads = gradients_like(size, args.device)
    results, bandwidth = run_all(args, repeats, ranks_list, grads)
    if "naive" in args.modes:
        print_table(results, ranks_list, args.device, [m for m in MODES if m in args.modes])
    if {"deferred", "deferred+noise"} <= set(args.modes):
        print_noise_overhead(results, ranks_list, args.device)
    print(f"load average (1 min) at the end: {load_average()}")
    if "naive" in args.modes:
        print_bandwidth(bandwidth, grads, rescale_allocated_bytes(grads, args.device))
        print_rescale_share(bandwidth, results, ranks_list, args.device)
        held = lookahead_held_bytes(size)
        print(f"look-ahead reads up to K-1 = {size.k - 1} micro-batches ahead: about {held:,} bytes")
        print("targets: time per step <= 1.03x naive on CPU DDP; peak memory <= 1.00x naive plus a constant")
    print(f"whole run: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
