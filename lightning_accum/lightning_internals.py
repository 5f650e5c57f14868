"""Every use of Lightning's private API, each behind a capability check that names the fix.

Verified on lightning 2.5.0 and 2.6.6 (CI runs the tests on both). The checks run at setup, so a Lightning
that lacks a part fails before training instead of training wrong:

- look-ahead mode reads the next batches from the fit loop's data fetcher (``fit_loop._data_fetcher``, its
  ``iterator``, prefetched ``batches`` and ``done``) and pushes them back;
- the optimizer step ends the epoch on this rank when the epoch loop's ``_num_ready_batches_reached()``;
- ``GlobalBatchLoader`` relies on Lightning saving and restoring the state of a ``_Stateful`` train loader
  (``CombinedLoader._state_dicts`` / ``_load_state_dicts``);
- under ``ModelParallelStrategy`` the rescaler refuses tensor parallelism, read from ``_tensor_parallel_size``;
- the rescaler tells whether its own hooks run for the current batch (Lightning's Tuner swaps the callbacks
  out) from the epoch loop's batch counter, and whether a fit resumed mid-epoch from ``restarted_mid_epoch``;
- a key that the rescaler and another hook both log is found in the active loop's results
  (``trainer._results``, each entry's ``_Metadata``: ``fx``, ``name``, ``forked_name``).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from lightning_accum.lookahead import PeekableIterator

SUPPORTED = "lightning>=2.5,<2.7"


def _missing_message(feature: str, missing: list[str], fix: str) -> str:
    return f"{feature} relies on Lightning internals that this Lightning lacks ({', '.join(missing)}). {fix}"


def require_lookahead_support(trainer: pl.Trainer) -> None:
    """Raise unless this Lightning lets look-ahead mode read batches ahead of its fit loop.

    Example::

        >>> require_lookahead_support(pl.Trainer(logger=False, enable_checkpointing=False))
    """
    missing = []
    try:
        from lightning.pytorch.loops.fetchers import _DataLoaderIterDataFetcher, _PrefetchDataFetcher  # noqa: F401
    except ImportError:
        missing.append("lightning.pytorch.loops.fetchers._PrefetchDataFetcher, _DataLoaderIterDataFetcher")
    else:
        probe = _PrefetchDataFetcher()
        missing += [
            f"_PrefetchDataFetcher.{name}" for name in ("iterator", "batches", "done") if not hasattr(probe, name)
        ]
    if not hasattr(trainer.fit_loop, "_data_fetcher"):
        missing.append("fit_loop._data_fetcher")
    if missing:
        fix = f"Install {SUPPORTED}, or use SampleCountRescaler's default mode (mode='deferred')."
        raise RuntimeError(_missing_message("SampleCountRescaler(mode='lookahead')", missing, fix))


def upcoming_batches(trainer: pl.Trainer, batch_idx: int, n: int) -> list[Any]:
    """The next ``n`` batches after ``batch_idx`` that the fit loop will receive, without consuming them.

    Fewer at the epoch's end: Lightning also ends an epoch at ``num_training_batches``.

    Batches the fetcher has already prefetched come first; the rest are read from its iterator, which is
    wrapped once in a ``PeekableIterator`` so that the loop still receives every batch, in order.
    """
    from lightning.pytorch.loops.fetchers import _DataLoaderIterDataFetcher

    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    if fetcher is None or isinstance(fetcher, _DataLoaderIterDataFetcher):
        raise RuntimeError(
            "SampleCountRescaler(mode='lookahead') cannot read ahead when training_step takes `dataloader_iter`: "
            "the module itself draws the batches. Use the default mode (mode='deferred')."
        )
    n = int(min(n, trainer.num_training_batches - batch_idx - 1))
    if n <= 0:
        return []
    prefetched = [item[0] for item in fetcher.batches][:n]  # items are (batch, batch_idx, dataloader_idx)
    iterator = fetcher.iterator
    if not isinstance(iterator, PeekableIterator):
        iterator = fetcher.iterator = PeekableIterator(iterator)
    read = [] if fetcher.done else iterator.peek(n - len(prefetched))
    return prefetched + [item[0] for item in read]


def require_loop_support() -> None:
    """Raise unless this Lightning's loops expose what the rescaler reads at every step and at resume.

    Example::

        >>> require_loop_support()
    """
    from lightning.pytorch.loops import _FitLoop
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    wanted = [(_TrainingEpochLoop, "_num_ready_batches_reached"), (_TrainingEpochLoop, "total_batch_idx")]
    wanted += [(_FitLoop, "restarted_mid_epoch"), (pl.Trainer, "_results")]
    missing = [f"{owner.__name__}.{name}" for owner, name in wanted if not hasattr(owner, name)]
    try:
        from lightning.pytorch.trainer.connectors.logger_connector.result import _Metadata
    except ImportError:
        missing.append("logger_connector.result._Metadata")
    else:
        fields = getattr(_Metadata, "__dataclass_fields__", {})
        missing += [f"_Metadata.{name}" for name in ("fx", "name") if name not in fields]
        missing += [] if hasattr(_Metadata, "forked_name") else ["_Metadata.forked_name"]
    if missing:
        raise RuntimeError(_missing_message("SampleCountRescaler", missing, f"Install {SUPPORTED}."))


def logged_keys(trainer: pl.Trainer) -> list[tuple[str, str]]:
    """``(hook, key)`` for every key that ``self.log`` calls in the active loop have logged so far.

    A value logged with both ``on_step`` and ``on_epoch`` appears under its three keys: ``name_step`` and
    ``name_epoch``, as loggers see them, and ``name``, which ``trainer.callback_metrics`` (monitors) also holds.

    Example::

        >>> logged_keys(pl.Trainer(logger=False, enable_checkpointing=False))  # no loop running
        []
    """
    results = trainer._results
    if results is None:
        return []
    keys = []
    for entry in results.values():
        meta = getattr(entry, "meta", None)
        if meta is not None:
            names = (meta.name, meta.forked_name(True), meta.forked_name(False))
            keys += [(meta.fx, key) for key in dict.fromkeys(names)]
    return keys


def batch_token(trainer: pl.Trainer) -> int:
    """A number that changes with every training batch the fit loop starts (its running batch index)."""
    return int(trainer.fit_loop.epoch_loop.total_batch_idx)


def resumed_mid_epoch(trainer: pl.Trainer) -> bool:
    """True at ``on_train_start`` when the fit restarts inside an epoch from a checkpoint."""
    return bool(trainer.fit_loop.restarted_mid_epoch)


def window_ends_epoch(trainer: pl.Trainer) -> bool:
    """True when the optimizer step being taken is the last of the epoch on this rank (automatic optimization)."""
    return bool(trainer.fit_loop.epoch_loop._num_ready_batches_reached())


def require_stateful_loader_support(loader: DataLoader) -> None:
    """Raise unless this Lightning saves and restores ``loader``'s ``state_dict`` in its checkpoints.

    Example::

        >>> class Stateful(DataLoader):
        ...     def state_dict(self): return {}
        ...     def load_state_dict(self, state): pass
        >>> require_stateful_loader_support(Stateful([1, 2]))
    """
    fix = f"Install {SUPPORTED}, or save and load GlobalBatchSampler.state_dict() yourself."
    try:
        from lightning.fabric.utilities.types import _Stateful
        from lightning.pytorch.utilities.combined_loader import CombinedLoader
    except ImportError as error:
        raise RuntimeError(_missing_message("GlobalBatchLoader", [str(error)], fix)) from error
    missing = [
        f"CombinedLoader.{name}" for name in ("_state_dicts", "_load_state_dicts") if not hasattr(CombinedLoader, name)
    ]
    if not isinstance(loader, _Stateful):
        missing.append("recognition as _Stateful")
    if missing:
        raise RuntimeError(_missing_message("GlobalBatchLoader", missing, fix))


def tensor_parallel_size(strategy: Any) -> int:
    """The tensor-parallel size of a ``ModelParallelStrategy`` (its ``_tensor_parallel_size``, resolved from
    ``"auto"`` in ``setup_environment``); 1 for any other strategy.

    Example::

        >>> from lightning.pytorch.strategies import ModelParallelStrategy
        >>> tensor_parallel_size(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
        1
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    if not isinstance(strategy, ModelParallelStrategy):
        return 1
    size = getattr(strategy, "_tensor_parallel_size", None)
    if not isinstance(size, int):
        raise RuntimeError(
            _missing_message(
                "SampleCountRescaler under ModelParallelStrategy",
                ["a resolved ModelParallelStrategy._tensor_parallel_size"],
                f"Install {SUPPORTED}, and set ModelParallelStrategy(tensor_parallel_size=1) explicitly.",
            )
        )
    return size
