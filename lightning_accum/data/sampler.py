"""``GlobalBatchSampler``: each optimizer step gets the same samples however the effective batch is split.

The epoch's order is one permutation of the whole dataset, seeded by ``seed + epoch`` and independent of
the world size. It is cut into windows of ``E = num_replicas * accumulate_grad_batches * micro_batch_size``
samples, one window per optimizer step. A window is cut into ``num_replicas * m`` consecutive micro-batches
(``m = accumulate_grad_batches`` for a full window) whose sizes differ by at most one, and micro-batch
``q`` goes to rank ``q % num_replicas``. So the union of a step's micro-batches over all ranks is the
window, whatever the split. The last, partial window gets ``m = ceil(n / (num_replicas * micro_batch_size))``
micro-batches on every rank; a micro-batch left with no sample is a whole padding micro-batch
``[PAD_INDEX]``, which ``GlobalBatchLoader`` fetches as a real sample and marks, and the rescaler counts as
nothing. Every sample appears exactly once
per epoch and every rank runs the same number of micro-batches. With ``lengths``, each window is instead cut
into the same number of micro-batches of similar lengths (``grouped_micro_batches``): the window, and so the
update under exact item weighting, stays the same; only the padding shrinks.
"""

from __future__ import annotations

import math
import operator
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from lightning_accum.data import permutation
from lightning_accum.data.cut_ahead import one_ahead
from lightning_accum.data.grouping import assign_groups, length_groups, require_budget
from lightning_accum.data.permutation import BackgroundDraw, EpochOrder

PAD_INDEX = -1
"""The index of a padding micro-batch ``[PAD_INDEX]``: ``GlobalBatchLoader`` fetches a real sample in its place and
marks it, and ``SampleCountRescaler`` counts it as 0 items; the dataset never sees it through the loader."""


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return value


def _slots(samples: int, num_replicas: int, micro_batch_size: int) -> int:
    """Micro-batches of a window of ``samples`` samples on all ranks: ``num_replicas * m``."""
    return num_replicas * math.ceil(samples / (num_replicas * micro_batch_size))


def window_micro_batches(window: list[int], num_replicas: int, rank: int, micro_batch_size: int) -> list[list[int]]:
    """Return ``rank``'s micro-batches of one step's ``window`` of sample indices.

    The window is cut into ``num_replicas * m`` consecutive micro-batches with
    ``m = ceil(len(window) / (num_replicas * micro_batch_size))``, sizes as equal as possible (at most
    ``micro_batch_size``); micro-batch ``q`` belongs to rank ``q % num_replicas``. A micro-batch without
    a sample is ``[PAD_INDEX]``.

    Examples:
        >>> window_micro_batches([5, 3, 8, 1, 9, 0, 2, 7], num_replicas=2, rank=0, micro_batch_size=2)
        [[5, 3], [9, 0]]
        >>> window_micro_batches([5, 3, 8, 1, 9, 0, 2, 7], num_replicas=2, rank=1, micro_batch_size=2)
        [[8, 1], [2, 7]]
        >>> window_micro_batches([5, 3, 8], num_replicas=2, rank=1, micro_batch_size=2)  # 3 items on 2 ranks
        [[8]]
        >>> window_micro_batches([5], num_replicas=2, rank=1, micro_batch_size=2)  # rank 1 runs short
        [[-1]]
    """
    slots = _slots(len(window), num_replicas, micro_batch_size)
    base, extra = divmod(len(window), slots)
    batches = []
    for q in range(rank, slots, num_replicas):
        start = q * base + min(q, extra)
        end = start + base + (q < extra)
        batches.append(window[start:end] or [PAD_INDEX])
    return batches


def grouped_micro_batches(
    window: list[int],
    lengths: Sequence[int] | torch.Tensor,
    num_replicas: int,
    rank: int,
    micro_batch_size: int,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """Return ``rank``'s micro-batches of ``window``, cut by length into the same number as ``window_micro_batches``.

    The window's ``num_replicas * m`` micro-batches are the runs of its length-sorted samples with the fewest
    padded tokens (``longest * samples`` each; ``grouping.length_groups``): at most ``micro_batch_size``
    samples each, or, with ``max_tokens``, any number of samples within ``max_tokens`` padded tokens. They are
    dealt to the ranks, ``m`` each, balancing padded tokens. An empty micro-batch is ``[PAD_INDEX]``.

    Examples:
        >>> lengths = [30, 5, 28, 6, 4, 31, 7, 5]  # sample i has lengths[i] tokens
        >>> window_micro_batches([0, 1, 2, 3, 4, 5, 6, 7], 1, 0, micro_batch_size=4)  # padded 4 * 30 + 4 * 31
        [[0, 1, 2, 3], [4, 5, 6, 7]]
        >>> grouped_micro_batches([0, 1, 2, 3, 4, 5, 6, 7], lengths, 1, 0, micro_batch_size=4)  # 4 * 31 + 4 * 6
        [[6, 2, 0, 5], [4, 1, 7, 3]]
        >>> grouped_micro_batches([0, 1, 2, 3, 4, 5, 6, 7], lengths, 1, 0, 4, max_tokens=93)  # 3 * 31 + 5 * 7
        [[2, 0, 5], [4, 1, 7, 3, 6]]
    """
    if isinstance(lengths, torch.Tensor):
        window_lengths = lengths.numpy()[np.asarray(window, dtype=np.int64)].tolist()
    else:
        window_lengths = [lengths[i] for i in window]
    groups = length_groups(
        window_lengths,
        _slots(len(window), num_replicas, micro_batch_size),
        max_samples=micro_batch_size if max_tokens is None else None,
        max_tokens=max_tokens,
    )
    costs = [window_lengths[group[-1]] * len(group) if group else 0 for group in groups]  # runs: the last is longest
    return [[window[p] for p in groups[g]] or [PAD_INDEX] for g in assign_groups(costs, num_replicas)[rank]]


def _lengths(lengths: Sequence[int] | torch.Tensor | Callable[[int], int], dataset_size: int) -> torch.Tensor:
    """Every sample's length as a 1-d tensor of positive ints (a callable is asked once per index): ``int32``
    when every length fits (4 bytes a sample: 400 MB at 100M samples), else ``int64``.

    A tensor or NumPy array is checked and converted whole; other sequences element by element.
    """
    if callable(lengths):
        lengths = [lengths(i) for i in range(dataset_size)]
    array_like = isinstance(lengths, torch.Tensor) or hasattr(lengths, "__array__")
    values = torch.as_tensor(lengths) if array_like else list(lengths)
    if len(values) != dataset_size:
        raise ValueError(
            f"`lengths` must give one length per sample: got {len(values)} for dataset_size={dataset_size}."
        )
    if array_like:
        if values.dim() != 1 or values.dtype == torch.bool or values.is_floating_point() or values.is_complex():
            raise ValueError(f"`lengths` must be a 1-d array of positive ints, got {values.dtype} of {values.dim()}-d.")
        short = (values < 1).nonzero()
        if len(short):
            index = int(short[0, 0])
            raise ValueError(f"`lengths` must be positive ints, got {values[index].item()!r} for sample {index}.")
        return values.to(_length_dtype(int(values.max()) if len(values) else 1))
    for index, value in enumerate(values):
        try:
            values[index] = operator.index(value)
        except TypeError:
            values[index] = 0
        if isinstance(value, bool) or values[index] < 1:
            raise ValueError(f"`lengths` must be positive ints, got {value!r} for sample {index}.")
    return torch.tensor(values, dtype=_length_dtype(max(values, default=1)))


def _length_dtype(longest: int) -> torch.dtype:
    return torch.int32 if longest < 2**31 else torch.int64


def _lengths_checksum(lengths: torch.Tensor, chunk: int = 2**20) -> int:
    """CRC-32 of the lengths as ``int64`` bytes (what earlier versions saved), converted a chunk at a time."""
    checksum = 0
    for part in lengths.split(chunk):
        checksum = zlib.crc32(part.to(torch.int64).numpy(), checksum)
    return checksum


class EpochPermutation(Sampler[int]):
    """The epoch's global order of all ``dataset_size`` indices, the same on every rank and for every split.

    ``GlobalBatchSampler`` keeps one as its ``sampler`` attribute, where Lightning calls ``set_epoch``
    at each epoch start (``batch_sampler.sampler.set_epoch``). The order is ``torch.randperm`` seeded by
    ``seed + epoch``, held as an ``int32`` tensor and read a window at a time (``order``); from
    ``permutation.DRAW_AHEAD_FROM`` samples it is drawn on a background thread, the next epoch's ahead.

    Examples:
        >>> order = EpochPermutation(5, shuffle=False)
        >>> list(order)
        [0, 1, 2, 3, 4]
        >>> shuffled = EpochPermutation(5, shuffle=True, seed=1)
        >>> first = list(shuffled)
        >>> shuffled.set_epoch(1)
        >>> sorted(first) == sorted(shuffled) and first != list(shuffled)
        True
    """

    def __init__(self, dataset_size: int, shuffle: bool = True, seed: int = 0) -> None:
        self.dataset_size = _positive_int("dataset_size", dataset_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an int, got {seed!r}.")
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.epoch = 0
        self._ahead: BackgroundDraw | None = None  # the next epoch's permutation, drawn ahead for large datasets

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation ``__iter__`` yields (seeded by ``seed + epoch``)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"`epoch` must be a non-negative int, got {epoch!r}.")
        self.epoch = epoch

    def order(self) -> EpochOrder:
        """The epoch's order, read a window at a time with ``take(start, stop)``."""
        n = self.dataset_size
        if not self.shuffle:
            return EpochOrder(n, None)
        seed = self.seed + self.epoch
        if n < permutation.DRAW_AHEAD_FROM:
            return EpochOrder(n, seed)
        draw = self._ahead if self._ahead is not None and self._ahead.seed == seed else BackgroundDraw(n, seed)
        self._ahead = None
        return EpochOrder(n, seed, draw, on_ready=lambda: self._draw_ahead(seed + 1))

    def _draw_ahead(self, seed: int) -> None:
        self._ahead = BackgroundDraw(self.dataset_size, seed)

    def indices(self) -> list[int]:
        """Return the epoch's order as a list."""
        return self.order().take(0, self.dataset_size)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_ahead": None}  # a thread does not pickle; the copy draws its own

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return self.dataset_size


class GlobalBatchSampler(Sampler[list[int]]):
    """Batch sampler for one rank: each optimizer step consumes the same samples for any split of its batch.

    For a fixed effective batch ``E = num_replicas * accumulate_grad_batches * micro_batch_size``, seed
    and epoch, the samples of every optimizer step (all micro-batches of its window on all ranks) are the
    same set whatever the split: 1 x 1 x E, 1 x 4 x E/4, 2 x 2 x E/4, ... Every sample is used once
    per epoch; ``drop_last=True`` drops the last window when it holds fewer than ``E`` samples. Where
    the last window leaves a rank's micro-batch empty it yields ``[PAD_INDEX]`` (``-1``) instead, and
    every rank yields the same number of micro-batches, so DDP cannot hang.

    With ``lengths`` (padding-free micro-batches), every window is cut by length instead
    (``grouped_micro_batches``): the same windows and number of micro-batches, each micro-batch of samples of
    similar lengths, with the fewest padded tokens (``longest length * samples``). Under exact item weighting
    (``SampleCountRescaler``) the trajectory is the ungrouped one up to float rounding. With ``max_tokens`` a
    micro-batch may hold any number of samples (short ones packed densely) within ``max_tokens`` padded
    tokens; the constructor refuses a budget under which some window of this dataset could not fit its
    micro-batches (e.g. a sample longer than the budget), naming the smallest budget that always fits, so no
    epoch can fail halfway.

    Use it with ``GlobalBatchLoader(dataset, GlobalBatchSampler(...))``, which Lightning checkpoints and
    resumes mid-epoch, and ``Trainer(use_distributed_sampler=False, accumulate_grad_batches=<the same K>)``.
    Lightning calls ``set_epoch`` on ``batch_sampler.sampler`` at every epoch start. The sampler keeps no
    count of what it yielded (``DataLoader`` workers run ahead of training): the loader owns the position of
    the batches it delivered, and ``resume`` makes the next iteration start after them.

    Args:
        dataset_size: number of samples in the dataset.
        micro_batch_size: largest number of samples in one micro-batch (the DataLoader's batch size).
        accumulate_grad_batches: micro-batches per rank per optimizer step; the Trainer's K.
        num_replicas: world size; default ``torch.distributed``'s world size if initialized, else 1.
        rank: this process's rank; default ``torch.distributed``'s rank if initialized, else 0.
        shuffle: shuffle the global order every epoch (seeded by ``seed + epoch``).
        seed: the shuffling seed; must be the same on every rank.
        drop_last: drop the last window when it holds fewer than ``E`` samples.
        lengths: each sample's padded length (e.g. its token count): a tensor or NumPy array (taken whole,
            without a loop over samples), a sequence, or ``index -> length`` (called once per index here);
            groups each window's micro-batches by length.
        max_tokens: with ``lengths``, the most padded tokens in one micro-batch instead of the most samples
            (``micro_batch_size`` then only sets ``E``).

    Examples:
        >>> one = GlobalBatchSampler(10, micro_batch_size=4, shuffle=False)
        >>> list(one)
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
        >>> ranks = [GlobalBatchSampler(10, 2, accumulate_grad_batches=1, num_replicas=2, rank=r, shuffle=False)
        ...          for r in (0, 1)]
        >>> [list(s) for s in ranks]  # the same 3 steps of samples {0..3}, {4..7}, {8, 9}
        [[[0, 1], [4, 5], [8]], [[2, 3], [6, 7], [9]]]
        >>> list(GlobalBatchSampler(5, 2, num_replicas=2, rank=1, shuffle=False))  # rank 1 runs short
        [[2, 3], [-1]]
        >>> lengths = [9, 2, 8, 3, 1, 9, 2, 2]
        >>> list(GlobalBatchSampler(8, 2, accumulate_grad_batches=4, shuffle=False, lengths=lengths))
        [[0, 5], [3, 2], [4, 1], [6, 7]]
        >>> list(GlobalBatchSampler(8, 2, accumulate_grad_batches=4, shuffle=False, lengths=lengths, max_tokens=15))
        [[4, 1, 6, 7, 3], [0], [5], [2]]
        >>> GlobalBatchSampler(8, 2, accumulate_grad_batches=4, lengths=lengths, max_tokens=9)
        Traceback (most recent call last):
        ...
        ValueError: a window of the 8 longest samples does not fit its 4 micro-batches of max_tokens=9 padded ...
    """

    def __init__(
        self,
        dataset_size: int,
        micro_batch_size: int,
        accumulate_grad_batches: int = 1,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        lengths: Sequence[int] | Callable[[int], int] | None = None,
        max_tokens: int | None = None,
    ) -> None:
        self.micro_batch_size = _positive_int("micro_batch_size", micro_batch_size)
        self.accumulate_grad_batches = _positive_int("accumulate_grad_batches", accumulate_grad_batches)
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        self.num_replicas = _positive_int("num_replicas", num_replicas)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(
                f"`rank` must be an int in [0, {num_replicas - 1}] for num_replicas={num_replicas}, got {rank!r}."
            )
        self.rank = rank
        self.sampler = EpochPermutation(dataset_size, shuffle=shuffle, seed=seed)
        self.drop_last = bool(drop_last)
        if self.drop_last and dataset_size < self.effective_batch_size:
            raise ValueError(
                f"drop_last=True drops every sample: dataset_size={dataset_size} is smaller than the effective batch "
                f"num_replicas * accumulate_grad_batches * micro_batch_size = {self.effective_batch_size}. "
                "Use drop_last=False or a smaller micro_batch_size or accumulate_grad_batches."
            )
        self.lengths = None if lengths is None else _lengths(lengths, dataset_size)
        if max_tokens is not None and self.lengths is None:
            raise ValueError(f"max_tokens={max_tokens!r} needs `lengths`: pass each sample's length.")
        self.max_tokens = None if max_tokens is None else _positive_int("max_tokens", max_tokens)
        if self.max_tokens is not None:
            self._require_budget()
        # What cuts the windows, as layout() reports it: None, or a checksum of the lengths and max_tokens.
        self._grouping: dict[str, int | None] | None = None
        if self.lengths is not None:
            self._grouping = {"lengths_crc32": _lengths_checksum(self.lengths), "max_tokens": self.max_tokens}
        self._resume: tuple[int, int] | None = None  # (epoch, micro-batch) where that epoch's next iteration starts

    @property
    def effective_batch_size(self) -> int:
        """``E = num_replicas * accumulate_grad_batches * micro_batch_size``: samples per full optimizer step."""
        return self.num_replicas * self.accumulate_grad_batches * self.micro_batch_size

    @property
    def dataset_size(self) -> int:
        """Number of samples the permutation covers."""
        return self.sampler.dataset_size

    @property
    def epoch(self) -> int:
        """The epoch whose permutation the next iteration draws from."""
        return self.sampler.epoch

    def _require_budget(self) -> None:
        """Raise unless every possible window fits its micro-batches within ``max_tokens``."""
        full, rest = self._windows()
        windows = [(self.effective_batch_size, self.num_replicas * self.accumulate_grad_batches)] if full else []
        if rest:
            windows.append((rest, _slots(rest, self.num_replicas, self.micro_batch_size)))
        require_budget(self.lengths, windows, self.max_tokens)

    def require_split(self, accumulate_grad_batches: int, world_size: int, rank: int) -> None:
        """Raise unless this sampler was built for the run's K, world size and rank.

        Otherwise its windows are not the optimizer steps (or every rank draws the same samples).

        Examples:
            >>> GlobalBatchSampler(10, 2, accumulate_grad_batches=3).require_split(3, 1, 0)
            >>> GlobalBatchSampler(10, 2).require_split(3, 2, 1)
            Traceback (most recent call last):
            ...
            ValueError: GlobalBatchSampler was built for K=1 on 1 rank(s) as rank 0, but the Trainer runs K=3 ...
        """
        built = (self.accumulate_grad_batches, self.num_replicas, self.rank)
        if built != (accumulate_grad_batches, world_size, rank):
            raise ValueError(
                f"GlobalBatchSampler was built for K={built[0]} on {built[1]} rank(s) as rank {built[2]}, but the "
                f"Trainer runs K={accumulate_grad_batches} on {world_size} rank(s) and this is rank {rank}: its "
                "windows would not be the optimizer steps. Build it in train_dataloader() from "
                "self.trainer.accumulate_grad_batches, world_size and global_rank (and reload the loader each epoch, "
                "reload_dataloaders_every_n_epochs=1, when a GradientAccumulationScheduler changes K)."
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (same as ``sampler.set_epoch``); a resume position applies to its own epoch only."""
        self.sampler.set_epoch(epoch)

    @property
    def start(self) -> int:
        """The micro-batch the next iteration starts at: the resume position if it is this epoch's, else 0."""
        if self._resume is None or self._resume[0] != self.epoch:
            return 0
        return self._resume[1]

    def _windows(self) -> tuple[int, int]:
        """Return ``(number of full windows, samples in the last partial window)`` of one epoch."""
        full, rest = divmod(self.dataset_size, self.effective_batch_size)
        return full, 0 if self.drop_last else rest

    def _micro_batches_per_epoch(self, num_replicas: int, accumulate_grad_batches: int, micro_batch_size: int) -> int:
        """Micro-batches per rank and epoch under a split of this sampler's effective batch."""
        full, rest = self._windows()  # the same for every split of the same effective batch
        return full * accumulate_grad_batches + math.ceil(rest / (num_replicas * micro_batch_size))

    def __len__(self) -> int:
        return self._micro_batches_per_epoch(self.num_replicas, self.accumulate_grad_batches, self.micro_batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.sampler.order()
        start, self._resume = self.start, None
        windows = self._windows_from(start)

        def cut(window: tuple[int, int, int]) -> tuple[int, list[list[int]]]:
            begin, stop, position = window
            return position, self._micro_batches(order.take(begin, stop))

        # Grouped windows take milliseconds each: the next is cut on a thread while this one trains.
        for position, batches in map(cut, windows) if self.lengths is None else one_ahead(cut, windows):
            for batch in batches:
                if position >= start:
                    yield batch
                position += 1

    def _windows_from(self, start: int) -> Iterator[tuple[int, int, int]]:
        """``(first sample, end sample, first micro-batch)`` of each window with micro-batches from ``start`` on.

        A window that a resume position has passed is skipped without drawing or cutting it.
        """
        size = self.effective_batch_size
        full, rest = self._windows()
        position = 0
        for step in range(full + (rest > 0)):
            samples = size if step < full else rest
            per_rank = _slots(samples, self.num_replicas, self.micro_batch_size) // self.num_replicas
            if position + per_rank > start:
                yield step * size, step * size + samples, position
            position += per_rank

    def _micro_batches(self, window: list[int]) -> list[list[int]]:
        """This rank's micro-batches of one window."""
        if self.lengths is None:
            return window_micro_batches(window, self.num_replicas, self.rank, self.micro_batch_size)
        return grouped_micro_batches(
            window, self.lengths, self.num_replicas, self.rank, self.micro_batch_size, self.max_tokens
        )

    def layout(self) -> dict[str, Any]:
        """The settings that decide which samples each micro-batch holds: what a saved position refers to."""
        return {
            "dataset_size": self.dataset_size,
            "micro_batch_size": self.micro_batch_size,
            "accumulate_grad_batches": self.accumulate_grad_batches,
            "num_replicas": self.num_replicas,
            "shuffle": self.sampler.shuffle,
            "seed": self.sampler.seed,
            "drop_last": self.drop_last,
            "grouping": None if self._grouping is None else dict(self._grouping),
        }

    def resume(self, epoch: int, micro_batches: int, layout: dict[str, Any]) -> None:
        """Make the next iteration of ``epoch`` continue after its first ``micro_batches`` under ``layout``.

        ``layout`` is the ``layout()`` of the sampler that delivered them. The dataset size, shuffle, seed,
        drop_last, length grouping and effective batch must match this sampler's; the split (``num_replicas``,
        ``accumulate_grad_batches``, ``micro_batch_size``) may differ at an optimizer-step boundary. Another
        epoch's iteration is whole. ``GlobalBatchLoader.load_state_dict`` calls it.

        Examples:
            >>> saved = GlobalBatchSampler(30, 2, 4, num_replicas=1, rank=0, seed=9)  # 1 rank x K=4 x B=2
            >>> resumed = GlobalBatchSampler(30, 4, 1, num_replicas=2, rank=0, seed=9)  # 2 ranks x K=1 x B=4
            >>> resumed.resume(epoch=0, micro_batches=8, layout=saved.layout())  # after 2 steps of 4 micro-batches
            >>> resumed.start
            2
        """
        for key in ("dataset_size", "shuffle", "seed", "drop_last"):
            if layout[key] != self._setting(key):
                raise ValueError(
                    f"Cannot resume: the saved sampler has {key}={layout[key]!r}, this one {self._setting(key)!r}. "
                    f"Build the GlobalBatchSampler with {key}={layout[key]!r}."
                )
        saved_grouping = layout.get("grouping")  # absent from checkpoints of earlier versions: no grouping
        if saved_grouping != self._grouping:
            raise ValueError(
                f"Cannot resume: the saved sampler cut its windows with grouping={saved_grouping!r}, this one with "
                f"{self._grouping!r}, so the saved position would skip or repeat samples. Build the "
                "GlobalBatchSampler with the saved `lengths` and `max_tokens` (none for grouping=None), e.g. the "
                "data module's group_by_length and max_tokens of the checkpointed run."
            )
        saved_r, saved_k, saved_b = (
            layout[key] for key in ("num_replicas", "accumulate_grad_batches", "micro_batch_size")
        )
        saved_e = saved_r * saved_k * saved_b
        if saved_e != self.effective_batch_size:
            raise ValueError(
                f"Cannot resume: the saved effective batch is {saved_e} samples per step, this sampler's is "
                f"{self.effective_batch_size}. Keep num_replicas * accumulate_grad_batches * micro_batch_size equal."
            )
        steps, within = divmod(micro_batches, saved_k)
        same_split = (saved_r, saved_k, saved_b) == (
            self.num_replicas,
            self.accumulate_grad_batches,
            self.micro_batch_size,
        )
        if micro_batches >= self._micro_batches_per_epoch(saved_r, saved_k, saved_b):  # the saved epoch is complete
            position = len(self)
        elif within and not same_split:
            raise ValueError(
                f"Cannot resume with a different split {within} micro-batches into an optimizer step; resume with "
                "the saved num_replicas, accumulate_grad_batches and micro_batch_size, or from a step boundary."
            )
        else:
            position = steps * self.accumulate_grad_batches + within
        self.sampler.set_epoch(epoch)
        self._resume = (epoch, position)

    def _setting(self, key: str) -> Any:
        return getattr(self.sampler, key) if key in ("shuffle", "seed") else getattr(self, key)
