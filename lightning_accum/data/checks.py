"""Train data that would silently change what the windows count or hold: reported once, at train start, with the fix."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_accum.data.loader import GlobalBatchLoader, each_loader
from lightning_accum.data.protocol import WindowSampler
from lightning_accum.data.sampler import GlobalBatchSampler


def repeated_samples(loader: Any) -> tuple[int, int, int] | None:
    """``(repeated, dataset size, ranks)`` when ``loader``'s ``DistributedSampler`` pads its shards with repeats.

    Examples:
        >>> sampler = DistributedSampler(range(7), num_replicas=2, rank=0, shuffle=False)
        >>> repeated_samples(DataLoader(range(7), sampler=sampler))
        (1, 7, 2)
    """
    sampler = loader.sampler if isinstance(loader, DataLoader) else None
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return None
    size = len(sampler.dataset)  # type: ignore[arg-type]
    repeated = sampler.total_size - size
    return (repeated, size, sampler.num_replicas) if repeated > 0 else None


def warn_about_repeated_samples(loader: Any) -> None:
    """Warn (rank 0) when the train loader's ``DistributedSampler`` repeats samples, which then count twice."""
    found = repeated_samples(loader)
    if found is None:
        return
    repeated, size, ranks = found
    rank_zero_warn(
        f"The DistributedSampler repeats {repeated} of the {size} training samples every epoch, to give {ranks} "
        "ranks equal shares, and SampleCountRescaler counts each repeat as an item. For an epoch of every sample "
        "once, use GlobalBatchLoader(dataset, GlobalBatchSampler(...)) with Trainer(use_distributed_sampler=False), "
        f"or a dataset size that is a multiple of {ranks}.",
        category=UserWarning,
    )


def require_window_split(loader: Any, accumulate_grad_batches: int, world_size: int, rank: int) -> None:
    """Raise, naming the fix, when ``loader``'s batch sampler forms windows for another split than the run's."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    if isinstance(batch_sampler, WindowSampler):  # its windows must be the optimizer steps
        batch_sampler.require_split(accumulate_grad_batches, world_size, rank)


def may_pad(sampler: GlobalBatchSampler) -> bool:
    """Whether some rank's epoch from ``sampler`` can hold a padding micro-batch ``[PAD_INDEX]``.

    Only a last, partial window pads: ungrouped, when it holds fewer samples than micro-batches; grouped by
    length, whenever there is one (a grouping may leave a micro-batch empty).

    Examples:
        >>> may_pad(GlobalBatchSampler(5, 2, num_replicas=2, rank=0)), may_pad(GlobalBatchSampler(5, 2))
        (True, False)
    """
    rest = 0 if sampler.drop_last else sampler.dataset_size % sampler.effective_batch_size
    if rest == 0:
        return False
    slots = sampler.num_replicas * math.ceil(rest / (sampler.num_replicas * sampler.micro_batch_size))
    return sampler.lengths is not None or rest < slots


def warn_about_padding_index(loader: Any) -> None:
    """Warn (rank 0) when a plain ``DataLoader`` hands a ``GlobalBatchSampler``'s padding index to the dataset.

    Only a dataset that turns ``-1`` into a placeholder its loss mask excludes is then exact; ``GlobalBatchLoader``
    fetches a real sample instead and the rescaler counts that micro-batch as nothing, for any dataset.
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    if isinstance(loader, GlobalBatchLoader) or not isinstance(batch_sampler, GlobalBatchSampler):
        return
    if may_pad(batch_sampler):
        rank_zero_warn(
            "The train DataLoader hands GlobalBatchSampler's padding index -1 to the dataset, and SampleCountRescaler "
            "counts whatever the dataset returns for it: a dataset that indexes plainly returns its last sample, "
            "which is then counted as an item. Use GlobalBatchLoader(dataset, GlobalBatchSampler(...)) in place of "
            "DataLoader(dataset, batch_sampler=...): it fetches a real sample for a padding micro-batch and the "
            "rescaler counts it as nothing, so the dataset needs no special case for -1.",
            category=UserWarning,
        )


def forms_windows(loader: Any) -> bool:
    """Whether every train loader in ``loader`` (one, or a list, tuple or dict of them) has a window sampler.

    Examples:
        >>> from lightning_accum import GlobalBatchLoader, GlobalBatchSampler
        >>> forms_windows(GlobalBatchLoader(range(8), GlobalBatchSampler(8, micro_batch_size=2)))
        True
        >>> forms_windows([DataLoader(range(8), batch_size=2)])
        False
    """
    return all(isinstance(getattr(item, "batch_sampler", None), WindowSampler) for item in each_loader(loader))


def warn_about_distributed_sampler(loader: Any, world_size: int) -> None:
    """Warn (rank 0) when several ranks train on a loader that deals out samples per rank (Lightning's injected
    ``DistributedSampler``, or any sampler but a window sampler): the steps then depend on the number of ranks.

    Not when that sampler repeats samples: ``warn_about_repeated_samples`` names the same fix.
    """
    if world_size <= 1 or forms_windows(loader) or repeated_samples(loader) is not None:
        return
    rank_zero_warn(
        f"The train loader deals its samples out to the {world_size} ranks itself (Lightning's DistributedSampler, "
        "which shuffles per rank, or your own sampler), so which samples share an optimizer step depends on the "
        "number of ranks: each step is the exact item mean of its samples, but the trajectory differs from a run "
        "on another number of ranks or one process. For the same steps on any number of ranks, return "
        "GlobalBatchLoader(dataset, GlobalBatchSampler(len(dataset), micro_batch_size, accumulate_grad_batches)) "
        "from train_dataloader() and set Trainer(use_distributed_sampler=False).",
        category=UserWarning,
    )


def warn_about_train_data(loader: Any, resumed_mid_epoch: bool, world_size: int = 1) -> None:
    """Warn (rank 0) about train data that changes what the windows count or which samples share a step:
    repeats, a padding index handed to the dataset, steps that depend on the number of ranks, or a replayed
    epoch."""
    warn_about_repeated_samples(loader)
    warn_about_padding_index(loader)
    warn_about_distributed_sampler(loader, world_size)
    if resumed_mid_epoch:
        warn_unless_loaders_resume(loader)


def warn_unless_loaders_resume(loader: Any) -> None:
    """Warn (rank 0) that a fit resumed inside an epoch replays it, unless every train loader is resumable."""
    loaders = loader if isinstance(loader, list | tuple) else [loader]
    if all(hasattr(item, "state_dict") and hasattr(item, "load_state_dict") for item in loaders):
        return
    rank_zero_warn(
        "This fit resumes inside an epoch, but its train DataLoader cannot resume there: Lightning starts the "
        "epoch's data over while it counts on from the saved batch, so samples are trained twice and others not "
        "at all. Use GlobalBatchLoader(dataset, GlobalBatchSampler(...)), which Lightning resumes at the next "
        "unseen micro-batch, or resume from a checkpoint at an epoch's end.",
        category=UserWarning,
    )
