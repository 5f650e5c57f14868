"""What the data path costs at cluster sizes: ``GlobalBatchSampler`` per window, at the first batch, in memory.

For plain, length-grouped (``lengths``) and token-budget (``max_tokens = 4096 * B``, the longest sample times
B: 32,768 at B = 8, 16,384 at B = 4) windows at R = 8, 64 and 512 ranks (K x B = 4 x 8, 8 x 4 and 8 x 4:
windows of 256, 2,048 and 16,384 samples) and datasets of 1e5 to 1e8 samples, it prints the milliseconds per
window (one rank's micro-batches of one optimizer step), the latency of the first batch (building the sampler
from a NumPy array of lengths, drawing the epoch's order, cutting the first window; with Numba the kernels are
loaded before, their one-time cost printed apart) and the peak extra memory,
for the sampler as it is ("new") and as it was ("old": the epoch's order as a Python list of ``randperm``,
lengths checked one by one, the budget check sorting every length, and the layered dynamic programme and rank
scan of ``scripts/grouping_reference.py``). An old configuration whose programme would take longer than
``--old-cap`` seconds or more than ``--old-memory`` GiB per window is skipped with a note.
Then it measures the grouping with both cores busy with other work (two processes each multiplying matrices on
one thread), and the share of a training step spent in the sampler, with ``num_workers=0`` and ``2``, at 64
ranks' window sizes (a step of K micro-batches whose model time is ``--step`` seconds, spent waiting as on a
GPU), with grouped windows cut one ahead on a thread as the sampler does and cut inline when due as it did
before, and how much longer the steps took than their model time. It prints figures and never judges them.

    python scripts/benchmark_sampler.py                                  # everything (half an hour on 2 busy cores)
    python scripts/benchmark_sampler.py --plot docs/sampler-scaling.png  # and draw how costs grow (log-log)
    python scripts/benchmark_sampler.py --quick                          # small sizes: a smoke check (minutes)

Each dataset size runs in a fresh process per implementation, so its high-water resident set belongs to it;
peak memory is the highest resident set size sampled every 2 ms while a configuration runs, less the resident
set size before it; from ``DRAW_AHEAD_FROM`` samples the new sampler's background draw goes on after the timed
windows, so its memory shows only in part (docs/evidence/benchmarks.md measures it to the end). Lengths are
``exp(N(log 300, 0.9))`` rounded into ``[8, 4096]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import operator
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from grouping_reference import reference_assign_groups, reference_length_groups
from torch.utils.data import DataLoader

from lightning_accum import GlobalBatchSampler
from lightning_accum.data import compiled_passes
from lightning_accum.data import grouping as grouping_module
from lightning_accum.data import sampler as sampler_module
from lightning_accum.data.grouping import padded_tokens
from lightning_accum.data.sampler import window_micro_batches

SPLITS = {8: (4, 8), 64: (8, 4), 512: (8, 4)}  # ranks -> (K, B)
MODES = ("plain", "grouped", "max_tokens")
LONGEST = 4096
SIZES = (10**5, 10**6, 10**7, 10**8)
PAGE = os.sysconf("SC_PAGE_SIZE")


def machine() -> str:
    """The machine as a spec: CPU model, cores, versions."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "unknown CPU",
    )
    versions = f"Python {platform.python_version()}, torch {torch.__version__}, NumPy {np.__version__}"
    if compiled_passes.available():
        import numba

        versions += f", Numba {numba.__version__}"
    else:
        versions += ", no Numba (the passes in Python)"
    return f"{model}, {os.cpu_count()} cores; {versions}"


def lengths_of(n: int) -> np.ndarray:
    """``n`` token lengths: many short, few long, in ``[8, 4096]``."""
    rng = np.random.default_rng(0)
    return np.clip(np.rint(np.exp(rng.normal(math.log(300), 0.9, size=n))), 8, 4096).astype(np.int32)


def resident() -> int:
    """This process's resident set size in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class PeakMemory:
    """The highest resident set size above the one at entry, sampled every 2 ms on a thread."""

    def __enter__(self) -> PeakMemory:
        gc.collect()
        self.base = self.peak = resident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, resident())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def old_cost(mode: str, ranks: int) -> tuple[float, float]:
    """Estimated seconds and GiB of one window of the old layered programme (from its loop and tensor sizes)."""
    k, b = SPLITS[ranks]
    samples, groups = ranks * k * b, ranks * k
    width = b if mode == "grouped" else min(samples, LONGEST * b // 8)
    cells = (samples + 1) * (width + 1)
    return groups * (cells * 1e-8 + 2e-3), cells * 8 * 6 / 2**30


def old_batches(
    n: int, ranks: int, mode: str, lengths: list[int] | None, setup: Callable[[], None]
) -> Iterator[list[int]]:
    """Rank 0's micro-batches as the sampler cut them before: a list permutation, the layered programme."""
    setup()
    k, b = SPLITS[ranks]
    size = ranks * k * b
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    for step in range(math.ceil(n / size)):
        window = order[step * size : (step + 1) * size]
        if lengths is None:
            yield from window_micro_batches(window, ranks, 0, b)
            continue
        window_lengths = [lengths[i] for i in window]
        slots = ranks * math.ceil(len(window) / (ranks * b))
        budget = LONGEST * b if mode == "max_tokens" else None
        groups = reference_length_groups(window_lengths, slots, None if budget else b, budget)
        costs = [padded_tokens([window_lengths[p] for p in group]) for group in groups]
        for g in reference_assign_groups(costs, ranks)[0]:
            yield [window[p] for p in groups[g]] or [-1]


def old_setup(lengths: list[int] | None, mode: str) -> Callable[[], None]:
    """The old constructor's work on lengths: checked one by one, a checksum, a full sort for the budget."""

    def setup() -> None:
        if lengths is None:
            return
        values = [operator.index(value) for value in lengths]
        if min(values) < 1:
            raise ValueError("lengths must be positive")
        zlib.crc32(array("q", values).tobytes())
        if mode == "max_tokens":
            sorted(values, reverse=True)

    return setup


def measure(batches: Callable[[], Iterator[list[int]]], per_window: int, windows: int) -> dict[str, float]:
    """First-batch seconds, ms per window over the next ``windows`` windows (or 20 s of them), peak extra MiB."""
    with PeakMemory() as memory:
        start = time.perf_counter()
        iterator = batches()
        next(iterator)
        first = time.perf_counter() - start
        for _ in range(per_window - 1):  # the rest of the first window, cut with the first batch
            next(iterator)
        start = time.perf_counter()
        taken = 0
        for _ in range(per_window * windows):
            if next(iterator, None) is None or time.perf_counter() - start > 20:
                break
            taken += 1
        elapsed = time.perf_counter() - start
        del iterator
    return {"first_s": first, "ms_per_window": 1e3 * elapsed * per_window / max(taken, 1), "mib": memory.mib}


def run_worker(implementation: str, n: int, ranks_list: list[int], windows: int, cap: float, gib: float) -> list:
    """Every mode and rank count at one dataset size, for one implementation.

    The old grouping's cost per window does not depend on the dataset size: above 1e5 samples only its plain
    windows and 8 ranks' windows run (their first batch grows with the dataset).
    """
    rows = []
    data = lengths_of(n)
    if implementation == "python":  # the sampler as it is, without Numba: the passes in Python
        grouping_module.compiled = lambda: False
    elif implementation == "new":  # once per process, before the first window: printed apart (numba_load)
        load_kernels()
    for mode in MODES:
        for ranks in ranks_list:
            k, b = SPLITS[ranks]
            if ranks * k * b > n:
                continue
            row = {"implementation": implementation, "n": n, "mode": mode, "ranks": ranks}
            if implementation == "python" and mode == "plain":
                continue
            if implementation == "old":
                if n > min(SIZES) and mode != "plain" and ranks != min(SPLITS):
                    rows.append({**row, "skipped": "its window costs as at 1e5 samples"})
                    continue
                seconds, size = old_cost(mode, ranks)
                if mode != "plain" and (seconds > cap or size > gib):
                    rows.append({**row, "skipped": f"~{seconds:,.0f} s and ~{size:,.1f} GiB per window"})
                    continue
                if n * (40 if mode == "plain" else 120) > gib * 2**30:
                    rows.append(
                        {**row, "skipped": f"~{n * (40 if mode == 'plain' else 120) / 2**30:,.0f} GiB of lists"}
                    )
                    continue
                lengths = None if mode == "plain" else data.tolist()
                count = 1 if mode != "plain" and seconds > 1 else windows
                row |= measure(
                    functools.partial(old_batches, n, ranks, mode, lengths, old_setup(lengths, mode)), k, count
                )
                del lengths
            else:
                options = {} if mode == "plain" else {"lengths": data}
                if mode == "max_tokens":
                    options["max_tokens"] = LONGEST * b

                def batches(options: dict = options, ranks: int = ranks, k: int = k, b: int = b) -> Iterator:
                    return iter(GlobalBatchSampler(n, b, k, num_replicas=ranks, rank=0, seed=0, **options))

                row |= measure(batches, k, windows)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            gc.collect()
    return rows


def in_fresh_process(args: argparse.Namespace, implementation: str, n: int) -> list:
    """``run_worker`` in a fresh interpreter (its memory is its own); a failure becomes a skipped row."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "rows.json"
        command = [sys.executable, __file__, "--worker", implementation, "--worker-n", str(n), "--worker-out", str(out)]
        command += [
            "--windows",
            str(args.windows),
            "--old-cap",
            str(args.old_cap),
            "--old-memory",
            str(args.old_memory),
        ]
        command += ["--ranks", *map(str, args.ranks)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            note = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return [{"implementation": implementation, "n": n, "mode": "all", "ranks": 0, "skipped": note}]
        return json.loads(out.read_text())


def busy_ratios(args: argparse.Namespace) -> list[tuple[str, int, float, float]]:
    """ms per window of the grouping, quiet and with two other processes multiplying matrices."""
    quiet = {(r["mode"], r["ranks"]): r["ms_per_window"] for r in run_worker("new", 10**5, args.ranks, 20, 0, 0)}
    loop = "import torch; torch.set_num_threads(1); a = torch.randn(512, 512)\nwhile True: a @ a"
    others = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(2)]
    try:
        time.sleep(2)
        busy = {(r["mode"], r["ranks"]): r["ms_per_window"] for r in run_worker("new", 10**5, args.ranks, 20, 0, 0)}
    finally:
        for other in others:
            other.kill()
            other.wait()
    return [(mode, ranks, quiet[mode, ranks], busy[mode, ranks]) for mode, ranks in quiet if mode != "plain"]


class TimedBatches:
    """A batch sampler that adds up the time spent drawing its batches."""

    def __init__(self, sampler: GlobalBatchSampler) -> None:
        self.sampler, self.seconds = sampler, 0.0

    def __iter__(self) -> Iterator[list[int]]:
        iterator = iter(self.sampler)
        while True:
            start = time.perf_counter()
            batch = next(iterator, None)
            self.seconds += time.perf_counter() - start
            if batch is None:
                return
            yield batch

    def __len__(self) -> int:
        return len(self.sampler)


def step_share(mode: str, workers: int, steps: int, step_seconds: float) -> tuple[float, float]:
    """The sampler's share of ``steps`` training steps at 64 ranks (K = 8 micro-batches each), and how much
    longer the steps took than their model time (the step's wait for data, whatever thread did the work)."""
    k, b = SPLITS[64]
    n = 64 * k * b * (steps + 1)
    options = {} if mode == "plain" else {"lengths": lengths_of(n)}
    if mode == "max_tokens":
        options["max_tokens"] = LONGEST * b
    load_kernels()  # steady state: the one-time load is printed apart (numba_load)
    timed = TimedBatches(GlobalBatchSampler(n, b, k, num_replicas=64, rank=0, seed=0, **options))
    loader = DataLoader(range(n), batch_sampler=timed, num_workers=workers, collate_fn=len)
    start = time.perf_counter()
    for index, _ in enumerate(loader):
        time.sleep(step_seconds / k)  # the model's share of the step: the host waits for the device
        if index + 1 == steps * k:
            break
    elapsed = time.perf_counter() - start
    return timed.seconds / elapsed, elapsed / (steps * step_seconds) - 1


def cut_inline(work: Callable, items: Iterator) -> Iterator:
    """Cut every window on the caller's thread when it is due, as the sampler did before it cut one ahead."""
    return map(work, items)


@contextlib.contextmanager
def patched(module: object, name: str, value: object) -> Iterator[None]:
    """``module.name`` set to ``value`` inside the block."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def load_kernels() -> None:
    """Cut a window that needs the price search, so that Numba's kernels load (or compile) before any timing."""
    grouping_module.length_groups(np.arange(1, 9), 3)


NUMBA_LOAD = """
import os, time
import numpy as np
from lightning_accum.data.grouping import length_groups
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before, start = resident(), time.perf_counter()
length_groups(np.arange(1, 9), 3)  # a window that needs the price search: the kernels load (or compile)
print(time.perf_counter() - start, (resident() - before) / 2**20)
"""


def numba_load() -> str:
    """What the compiled passes cost once per process: importing Numba and loading its cached kernels (and, in a
    fresh cache folder, compiling them, as the first run after an install does)."""
    figures = []
    with tempfile.TemporaryDirectory() as folder:
        for env in ({}, {"NUMBA_CACHE_DIR": folder}, {}):
            done = subprocess.run(
                [sys.executable, "-c", NUMBA_LOAD], env=os.environ | env, capture_output=True, text=True, check=True
            )
            figures.append([float(x) for x in done.stdout.split()])
    (warm, warm_mib), (cold, cold_mib) = figures[2], figures[1]
    return (
        f"Numba kernels, once per process: {warm:.2f} s and +{warm_mib:.0f} MiB resident from the cache, "
        f"{cold:.2f} s and +{cold_mib:.0f} MiB compiling them into an empty cache (the first run after an install)"
    )


def table(rows: list[dict]) -> None:
    """New beside old, one line per mode, ranks and dataset size."""
    by_key = {(r["implementation"], r["mode"], r["ranks"], r["n"]): r for r in rows}
    print(
        f"{'mode':<10} {'ranks':>5} {'samples':>9}  {'ms/window new':>13} {'old':>9}  "
        f"{'first batch s new':>17} {'old':>8}  {'peak MiB new':>12} {'old':>8}"
    )
    notes = []
    for mode in MODES:
        for ranks in sorted({r["ranks"] for r in rows if r["mode"] == mode}):
            for n in sorted({r["n"] for r in rows if r["mode"] == mode and r["ranks"] == ranks}):
                new, old = by_key.get(("new", mode, ranks, n), {}), by_key.get(("old", mode, ranks, n), {})
                cells = []
                for key, spec in (("ms_per_window", ".2f"), ("first_s", ".3f"), ("mib", ".0f")):
                    cells += [
                        format(new[key], spec) if key in new else "-",
                        format(old[key], spec) if key in old else "-",
                    ]
                print(
                    f"{mode:<10} {ranks:>5} {n:>9.0e}  {cells[0]:>13} {cells[1]:>9}  {cells[2]:>17} {cells[3]:>8}  "
                    f"{cells[4]:>12} {cells[5]:>8}"
                )
                notes += [
                    f"{impl} {mode} R={ranks} n={n:.0e}: skipped, {r['skipped']}"
                    for impl, r in (("new", new), ("old", old))
                    if "skipped" in r
                ]
    skipped_all = [r for r in rows if r["mode"] == "all"]
    notes += [f"{r['implementation']} n={r['n']:.0e}: skipped, {r['skipped']}" for r in skipped_all]
    for note in notes:
        print("note:", note)


def plot(rows: list[dict], path: Path, spec: str) -> None:
    """Log-log: first-batch latency against dataset size, ms per window against window size; old dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"plain": "tab:blue", "grouped": "tab:green", "max_tokens": "tab:red"}
    for implementation, style in (("new", "-o"), ("old", "--x")):
        for mode in MODES:
            first = sorted(
                (r["n"], r["first_s"])
                for r in rows
                if r["implementation"] == implementation
                and r["mode"] == mode
                and r["ranks"] == min(SPLITS)
                and "first_s" in r
            )
            if first:
                left.plot(*zip(*first, strict=True), style, color=colors[mode], label=f"{mode} ({implementation})")
            smallest = min((r["n"] for r in rows), default=0)
            per_window = sorted(
                (r["ranks"] * math.prod(SPLITS[r["ranks"]]), r["ms_per_window"])
                for r in rows
                if r["implementation"] == implementation
                and r["mode"] == mode
                and r["n"] == smallest
                and "ms_per_window" in r
            )
            if per_window:
                right.plot(
                    *zip(*per_window, strict=True), style, color=colors[mode], label=f"{mode} ({implementation})"
                )
    left.set(
        xscale="log",
        yscale="log",
        xlabel="dataset samples",
        ylabel="first batch (s)",
        title=f"epoch start, {min(SPLITS)} ranks",
    )
    right.set(
        xscale="log",
        yscale="log",
        xlabel="window samples (8, 64, 512 ranks)",
        ylabel="ms per window",
        title="one rank's micro-batches of one step",
    )
    for axes in (left, right):
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7)
    figure.suptitle(spec, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def without_numba(args: argparse.Namespace, rows: list[dict]) -> None:
    """The grouped windows again with the passes in Python (an install without the ``fast`` extra), beside the
    compiled figures of the same run, at the smallest dataset size (a window's cost does not depend on it)."""
    n = min(args.sizes)
    compiled = {(r["mode"], r["ranks"]): r for r in rows if r["implementation"] == "new" and r["n"] == n}
    print(f"\nwithout Numba (the passes in Python: an install without the `fast` extra), {n:.0e} samples:")
    print(f"{'mode':<10} {'ranks':>5}  {'ms/window':>9} {'compiled':>8} {'ratio':>6}")
    for row in in_fresh_process(args, "python", n):
        if "ms_per_window" in row:
            fast = compiled.get((row["mode"], row["ranks"]), {}).get("ms_per_window", math.nan)
            ratio = row["ms_per_window"] / fast
            print(f"{row['mode']:<10} {row['ranks']:>5}  {row['ms_per_window']:>9.2f} {fast:>8.2f} {ratio:>6.1f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1e5 samples, 8 and 64 ranks: a smoke check")
    parser.add_argument("--sizes", type=float, nargs="+", help="dataset sizes (default 1e5 1e6 1e7 1e8)")
    parser.add_argument("--ranks", type=int, nargs="+", help="rank counts (default 8 64 512)")
    parser.add_argument("--windows", type=int, help="windows timed per configuration (default 20; --quick 3)")
    parser.add_argument("--old-cap", type=float, default=120.0, help="skip old windows estimated longer (s)")
    parser.add_argument("--old-memory", type=float, default=8.0, help="skip old configurations estimated larger (GiB)")
    parser.add_argument("--step", type=float, default=0.1, help="model seconds per training step (share)")
    parser.add_argument("--plot", type=Path, help="draw the log-log figure to this PNG")
    parser.add_argument("--worker", choices=("new", "old", "python"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.ranks = args.ranks or ([8, 64] if args.quick else [8, 64, 512])
    args.windows = args.windows or (3 if args.quick else 20)
    args.sizes = [int(size) for size in args.sizes or ([1e5] if args.quick else SIZES)]
    if args.quick:
        args.old_cap = min(args.old_cap, 2.0)
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    if args.worker:
        rows = run_worker(args.worker, args.worker_n, args.ranks, args.windows, args.old_cap, args.old_memory)
        args.worker_out.write_text(json.dumps(rows))
        return
    spec = machine()
    print(f"machine: {spec}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
    fast = compiled_passes.available()
    if fast:
        print(numba_load())
    rows = [row for n in args.sizes for impl in ("new", "old") for row in in_fresh_process(args, impl, n)]
    table(rows)
    if fast:
        without_numba(args, rows)
    if not args.quick:
        print("\nboth cores busy (two processes multiplying 512 x 512 matrices on one thread each), 1e5 samples:")
        print(f"{'mode':<10} {'ranks':>5}  {'quiet ms/window':>15} {'busy':>8} {'busy / quiet':>12}")
        for mode, ranks, quiet, busy in busy_ratios(args):
            print(f"{mode:<10} {ranks:>5}  {quiet:>15.2f} {busy:>8.2f} {busy / quiet:>12.2f}")
    steps = 3 if args.quick else 10
    print(f"\nsampler share of a training step at 64 ranks (K = 8, B = 4; {args.step:g} s of model time per step):")
    print(f"{'mode':<10} {'num_workers':>11} {'share %':>8}")
    delays = {}
    for mode in MODES:
        for workers in (0, 2):
            share, delays[mode, workers] = step_share(mode, workers, steps, args.step)
            print(f"{mode:<10} {workers:>11} {100 * share:>8.2f}")
    print("\nthe same with every window cut inline, when due (the sampler before it cut grouped windows one ahead),")
    print("and how much longer the steps took than their model time (sleep overshoot included: see plain):")
    print(f"{'mode':<10} {'num_workers':>11} {'inline share %':>14} {'delay % inline':>14} {'ahead':>6}")
    for mode in MODES:
        for workers in (0, 2):
            with patched(sampler_module, "one_ahead", cut_inline):
                share, delay = step_share(mode, workers, steps, args.step)
            ahead = delays[mode, workers]
            print(f"{mode:<10} {workers:>11} {100 * share:>14.2f} {100 * delay:>14.2f} {100 * ahead:>6.2f}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
    if args.plot:
        plot(rows, args.plot, spec)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
