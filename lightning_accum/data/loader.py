"""``GlobalBatchLoader``: a ``DataLoader`` over a ``GlobalBatchSampler`` that Lightning resumes mid-epoch.

Lightning (2.6.6, measured) saves ``state_dict()`` of every training ``DataLoader`` that has ``state_dict`` and
``load_state_dict`` into the checkpoint (``loops.fit_loop.state_dict.combined_loader``), and on a mid-epoch
resume calls ``load_state_dict`` before it asks the loader for an iterator. It does not skip batches itself:
a loader without state starts the epoch over. For a loader with a length, Lightning's training fetcher takes
no batch ahead, so the batches this loader has delivered are the batches training has consumed; the
sampler itself runs ahead of them by ``prefetch_factor * num_workers`` micro-batches when workers load data.

Padding is the loader's business, not the dataset's: ``GlobalBatchSampler`` pads a rank that runs short with
whole micro-batches ``[PAD_INDEX]``; the loader fetches a real sample in their place (so any map-style dataset
works unchanged) and records their positions, and ``SampleCountRescaler`` counts such a micro-batch as 0 items.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from lightning_accum.data.sampler import PAD_INDEX, GlobalBatchSampler
from lightning_accum.lightning_internals import require_stateful_loader_support, shift_batch_counters

SPLIT_KEYS = ("num_replicas", "accumulate_grad_batches", "micro_batch_size")


class GlobalBatchLoader(DataLoader):
    """``DataLoader(dataset, batch_sampler=sampler)`` that owns the position of the batches it delivered.

    ``state_dict()`` is the sampler's ``layout()`` with ``epoch`` and ``micro_batches``: the batches this
    loader's iterator has handed out (not how far workers have pulled indices from the sampler);
    ``load_state_dict`` makes the next iteration of that epoch start right after them. Lightning calls
    both, so ``trainer.fit(model, ckpt_path=...)`` from a mid-epoch checkpoint continues the epoch with
    the next unseen micro-batch. The iterator asks the sampler for indices only at its first batch, after
    Lightning's ``set_epoch``, so workers never prefetch a stale epoch. Other keyword arguments
    (``collate_fn``, ``num_workers``, ...) go to ``DataLoader``; ``in_order=False`` is refused (the positions
    of the delivered batches would be unknown).

    The dataset never sees the padding index: for a padding micro-batch ``[PAD_INDEX]`` the loader fetches
    ``[padding_substitute]`` (the shortest sample under length grouping, else sample 0) and records its
    position in the epoch; ``is_padding(position)`` answers for the batches delivered, and
    ``SampleCountRescaler`` counts those micro-batches as 0 items in both modes.

    Examples:
        >>> loader = GlobalBatchLoader(list(range(10)), GlobalBatchSampler(10, 2, shuffle=False))
        >>> batches = iter(loader)
        >>> next(batches).tolist(), next(batches).tolist()
        ([0, 1], [2, 3])
        >>> state = loader.state_dict()
        >>> state["epoch"], state["micro_batches"]
        (0, 2)
        >>> resumed = GlobalBatchLoader(list(range(10)), GlobalBatchSampler(10, 2, shuffle=False))
        >>> resumed.load_state_dict(state)
        >>> [batch.tolist() for batch in resumed]
        [[4, 5], [6, 7], [8, 9]]
        >>> sampler = GlobalBatchSampler(5, 2, num_replicas=2, rank=1, shuffle=False)  # rank 1 runs short
        >>> list(sampler)
        [[2, 3], [-1]]
        >>> short = GlobalBatchLoader(list(range(10, 15)), sampler)  # a list: [-1] would fetch its last item, 14
        >>> [batch.tolist() for batch in short], short.is_padding(0), short.is_padding(1)
        ([[12, 13], [10]], False, True)
    """

    batch_sampler: GlobalBatchSampler

    def __init__(self, dataset: Dataset, batch_sampler: GlobalBatchSampler, **kwargs: Any) -> None:
        if not isinstance(batch_sampler, GlobalBatchSampler):
            raise TypeError(
                f"GlobalBatchLoader needs a GlobalBatchSampler, got {type(batch_sampler).__name__}. "
                "Use a plain DataLoader for other samplers."
            )
        if kwargs.get("in_order") is False:
            raise ValueError(
                "GlobalBatchLoader delivers micro-batches in the sampler's order (its resume position and padding "
                "marks follow it): drop in_order=False."
            )
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self._position: tuple[int, int] | None = None  # (epoch, micro-batches delivered) of the last iteration
        self._padding: set[int] = set()  # positions in the epoch of the padding micro-batches sampled so far
        self._split_change: tuple[int, int] | None = None  # (saved, resumed) micro-batches until counters follow
        require_stateful_loader_support(self)

    @property
    def _index_sampler(self) -> _SubstitutePadding:
        """What ``DataLoader``'s iterators draw indices from: the sampler, with padding micro-batches replaced."""
        return _SubstitutePadding(self)

    @cached_property
    def padding_substitute(self) -> int:
        """The sample fetched for a padding micro-batch: the (first) shortest under length grouping, else sample 0."""
        lengths = self.batch_sampler.lengths
        return 0 if lengths is None else int(torch.argmin(torch.as_tensor(lengths)))

    def is_padding(self, position: int) -> bool:
        """Whether the current epoch's micro-batch ``position`` (Lightning's ``batch_idx``) is padding."""
        return position in self._padding

    def __iter__(self) -> Iterator[Any]:
        if self._split_change is not None:
            raise RuntimeError(
                "This GlobalBatchLoader resumed a checkpoint of another split, but Lightning's batch counters still "
                "count the saved split's micro-batches: SampleCountRescaler shifts them at train start. Add "
                "SampleCountRescaler() to the Trainer's callbacks, or resume with the saved num_replicas, "
                "accumulate_grad_batches and micro_batch_size."
            )
        sampler = self.batch_sampler
        epoch, delivered = sampler.epoch, sampler.start  # read before workers pull indices, which clears start
        self._position = (epoch, delivered)
        for batch in super().__iter__():
            delivered += 1
            self._position = (epoch, delivered)
            yield batch

    @property
    def position(self) -> tuple[int, int]:
        """``(epoch, micro-batches delivered in it)``; before any iteration, where the next one starts."""
        sampler = self.batch_sampler
        return (sampler.epoch, sampler.start) if self._position is None else self._position

    def state_dict(self) -> dict[str, Any]:
        """The sampler's layout and the position of the micro-batches delivered in the current (or last) epoch."""
        epoch, micro_batches = self.position
        return {**self.batch_sampler.layout(), "epoch": epoch, "micro_batches": micro_batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the sampler at the saved position (see ``GlobalBatchSampler.resume``).

        The split (``num_replicas``, ``accumulate_grad_batches``, ``micro_batch_size``) may differ from the saved
        one when the effective batch is the same and the checkpoint lies at an optimizer-step boundary (or an
        epoch's end). Lightning restores its batch counters in micro-batches of the saved split: the resumed fit's
        ``SampleCountRescaler`` shifts them to this split's at train start (``continue_loop_counters``), and the
        loader refuses to iterate until then.
        """
        sampler = self.batch_sampler
        sampler.resume(state_dict["epoch"], state_dict["micro_batches"], state_dict)
        self._position = None
        saved = tuple(state_dict[key] for key in SPLIT_KEYS)
        if saved != tuple(getattr(sampler, key) for key in SPLIT_KEYS):
            self._split_change = (state_dict["micro_batches"], sampler.start)

    def continue_loop_counters(self, trainer: Any) -> tuple[int, int] | None:
        """Shift ``trainer``'s micro-batch counters of the resumed epoch to this loader's split (once, if resumed
        under another split); ``SampleCountRescaler`` calls it at train start. Returns the (saved, resumed)
        micro-batches of the shift, or ``None``."""
        change, self._split_change = self._split_change, None
        if change is not None:
            shift_batch_counters(trainer, *change)
        return change


class _SubstitutePadding:
    """A loader's batch sampler as its ``DataLoader`` iterators read it: padding fetched as a real sample, marked."""

    def __init__(self, loader: GlobalBatchLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        sampler, loader = self.loader.batch_sampler, self.loader
        position = sampler.start  # before the sampler's iteration, which clears its resume position
        loader._padding = set()
        for batch in sampler:
            if PAD_INDEX in batch:
                if len(batch) != 1:
                    raise RuntimeError(
                        f"{type(sampler).__name__} yielded the padding index inside micro-batch {position} "
                        f"({batch}); padding must be a whole micro-batch [PAD_INDEX]."
                    )
                loader._padding.add(position)
                batch = [loader.padding_substitute]
            yield batch
            position += 1


def each_loader(loaders: Any) -> list[Any]:
    """The loaders that Lightning holds as one, or as a list, tuple or dict of them (``trainer.train_dataloader``,
    ``trainer.val_dataloaders``), as a list in order.

    Examples:
        >>> each_loader({"a": range(2), "b": range(3)}), each_loader((range(2),)), each_loader(range(2))
        ([range(0, 2), range(0, 3)], [range(0, 2)], [range(0, 2)])
    """
    if isinstance(loaders, dict):
        return list(loaders.values())
    return list(loaders) if isinstance(loaders, list | tuple) else [loaders]


def is_padding(loader: Any, position: int) -> bool:
    """Whether micro-batch ``position`` of the epoch from the train ``loader`` is padding (counts 0 items).

    Only a ``GlobalBatchLoader`` delivers padding micro-batches; any other loader's batches are all real.

    Examples:
        >>> is_padding([[1, 2]], 0)
        False
    """
    return isinstance(loader, GlobalBatchLoader) and loader.is_padding(position)


def continue_loop_counters(trainer: Any) -> tuple[int, int] | None:
    """At train start: shift Lightning's micro-batch counters for a ``GlobalBatchLoader`` resumed under another split.

    Returns the (saved, resumed) micro-batches of the shift, or ``None`` when no loader changed its split.

    Examples:
        >>> import lightning.pytorch as pl
        >>> continue_loop_counters(pl.Trainer(logger=False, enable_checkpointing=False))  # no train loader: nothing
    """
    changes = [
        loader.continue_loop_counters(trainer)
        for loader in each_loader(trainer.train_dataloader)
        if isinstance(loader, GlobalBatchLoader)
    ]
    return next((change for change in changes if change is not None), None)
