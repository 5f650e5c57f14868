"""Every use of Lightning's private API, each behind a capability check that names the fix.

Verified on lightning 2.5.0 and 2.6.6 (CI runs the tests on both). The checks run at setup, so a Lightning
that lacks a part fails before training instead of training wrong:

- look-ahead mode reads the next batches from the fit loop's data fetcher (``fit_loop._data_fetcher``, its
  ``iterator``, prefetched ``batches`` and ``done``) and pushes them back;
- the optimizer step ends the epoch on this rank when the epoch loop's ``_num_ready_batches_reached()``;
- ``GlobalBatchLoader`` relies on Lightning saving and restoring the state of a ``_Stateful`` train loader
  (``CombinedLoader._state_dicts`` / ``_load_state_dicts``);
- under ``ModelParallelStrategy`` the rescaler refuses tensor parallelism, read from ``_tensor_parallel_size``;
- under ``DDPStrategy`` it refuses ``static_graph=True`` with accumulation, read from ``_ddp_kwargs``;
- the rescaler tells whether its own hooks run for the current batch (Lightning's Tuner swaps the callbacks
  out) from the epoch loop's batch counter, and whether a fit resumed mid-epoch from ``restarted_mid_epoch``;
- at a stop and a resume (``continuation.py``) it reads the fit loop's epoch and batch progress, reopens in a
  checkpoint an epoch that Lightning marked done after a stop inside it (``fit_loop.epoch_progress``), and
  sets a ``GradientAccumulationScheduler``'s K when Lightning resumes mid-epoch without ``on_train_epoch_start``.
- a fit resumed under another split shifts the epoch loop's micro-batch counters (``batch_progress``) from the
  saved split's micro-batches to the resumed split's (``shift_batch_counters``).
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

    Examples:
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

    Examples:
        >>> require_loop_support()
    """
    from lightning.pytorch.callbacks import GradientAccumulationScheduler
    from lightning.pytorch.loops import _FitLoop
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    wanted = [(_TrainingEpochLoop, "_num_ready_batches_reached"), (_TrainingEpochLoop, "total_batch_idx")]
    wanted += [(_FitLoop, "restarted_mid_epoch"), (_FitLoop, "on_save_checkpoint"), (_FitLoop, "state_dict")]
    wanted.append((GradientAccumulationScheduler, "get_accumulate_grad_batches"))
    wanted.append((pl.Trainer, "_results"))
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

    Examples:
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


def epoch_cut_short(trainer: pl.Trainer) -> tuple[int, int, int] | None:
    """``(epoch, batches run, batches in the epoch)`` when a stop ended the epoch Lightning marked processed.

    Lightning (2.5 and 2.6) counts an epoch processed when its loop ends, also when a stop (``should_stop``,
    which ``max_time`` sets, or ``max_steps``) ended it early; a checkpoint saved from then on resumes at the
    next epoch. ``None`` inside an epoch, at an epoch's natural end, before the first epoch, and for an epoch
    whose rest the module skipped (``on_train_batch_start`` returned -1), which the fit never meant to train.
    """
    fit_loop = trainer.fit_loop
    epochs = fit_loop.epoch_progress.current
    batches = fit_loop.epoch_loop.batch_progress
    in_epoch = trainer.num_training_batches
    stopped = trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step
    if not stopped or epochs.started == 0 or epochs.processed != epochs.started or batches.is_last_batch:
        return None
    if batches.current.ready >= in_epoch:
        return None
    return epochs.processed - 1, batches.current.ready, int(in_epoch)


def reopen_epoch(checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint saved after a stop inside an epoch resume inside that epoch (in place).

    ``epoch_cut_short`` saw the epoch counted processed (and, after ``on_train_end``, completed) with
    batches left: both counts go back by one, which is Lightning's own state of a checkpoint saved inside the
    epoch, so ``fit(ckpt_path=...)`` restarts mid-epoch, restores the train loader's position and continues
    after the last batch run. Call it before Lightning restores its loops (a callback's ``on_load_checkpoint``).

    Examples:
        >>> progress = {"ready": 2, "started": 2, "processed": 2, "completed": 2}
        >>> saved = {"loops": {"fit_loop": {"epoch_progress": {"total": dict(progress), "current": dict(progress)}}}}
        >>> reopen_epoch(saved)
        >>> saved["loops"]["fit_loop"]["epoch_progress"]["current"]
        {'ready': 2, 'started': 2, 'processed': 1, 'completed': 1}
    """
    try:
        progress = checkpoint["loops"]["fit_loop"]["epoch_progress"]
        counts = [progress[key] for key in ("total", "current")]
        unchanged = all(c["ready"] == c["started"] == c["processed"] for c in counts)
    except (KeyError, TypeError) as error:
        fix = f"Install {SUPPORTED}, or resume from a checkpoint saved inside the epoch or at its end."
        missing = [f"checkpoint['loops']['fit_loop']['epoch_progress'] ({error!r})"]
        raise RuntimeError(_missing_message("SampleCountRescaler's resume after a stop", missing, fix)) from error
    if not unchanged:
        raise RuntimeError("reopen_epoch: the checkpoint's epoch is not counted processed (a checkpoint inside it).")
    for count in counts:
        count["completed"] = min(count["completed"], count["processed"] - 1)
        count["processed"] -= 1


def saved_loader_states(checkpoint: dict[str, Any]) -> list[Any]:
    """The train loaders' ``state_dict()`` that Lightning saved in ``checkpoint`` (empty for loaders without one)."""
    loops = checkpoint.get("loops") or {}
    return list(loops.get("fit_loop", {}).get("state_dict", {}).get("combined_loader", []))


def resume_point(trainer: pl.Trainer) -> tuple[int, int]:
    """``(epoch, batch index)`` at which the fit loop will train next, read at ``on_train_start``."""
    epoch_loop = trainer.fit_loop.epoch_loop
    batch = epoch_loop.batch_progress.current.processed if epoch_loop.restarting else 0
    return trainer.current_epoch, 0 if batch >= trainer.num_training_batches else batch


def scheduled_accumulation(trainer: pl.Trainer) -> int | None:
    """The K that a ``GradientAccumulationScheduler`` among the callbacks sets for the current epoch, else None.

    Lightning applies the schedule in ``on_train_epoch_start``, which it skips when it resumes inside an epoch.
    """
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    for callback in trainer.callbacks:
        if isinstance(callback, GradientAccumulationScheduler):
            return int(callback.get_accumulate_grad_batches(trainer.current_epoch))
    return None


def window_ends_epoch(trainer: pl.Trainer) -> bool:
    """True when the optimizer step being taken is the last of the epoch on this rank (automatic optimization)."""
    return bool(trainer.fit_loop.epoch_loop._num_ready_batches_reached())


def require_stateful_loader_support(loader: DataLoader) -> None:
    """Raise unless this Lightning saves and restores ``loader``'s ``state_dict`` in its checkpoints.

    Examples:
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

    Examples:
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


def ddp_static_graph(strategy: Any) -> bool:
    """Whether a ``DDPStrategy`` wraps the model with ``static_graph=True`` (its ``_ddp_kwargs``); False otherwise.

    Examples:
        >>> from lightning.pytorch.strategies import DDPStrategy
        >>> ddp_static_graph(DDPStrategy(static_graph=True)), ddp_static_graph(DDPStrategy())
        (True, False)
    """
    from lightning.pytorch.strategies import DDPStrategy

    if not isinstance(strategy, DDPStrategy):
        return False
    kwargs = getattr(strategy, "_ddp_kwargs", None)
    if not isinstance(kwargs, dict):
        raise RuntimeError(
            _missing_message(
                "SampleCountRescaler under DDPStrategy",
                ["DDPStrategy._ddp_kwargs"],
                f"Install {SUPPORTED}.",
            )
        )
    return bool(kwargs.get("static_graph", False))


_COUNTERS = ("ready", "started", "processed", "completed")


def require_batch_counter_support(trainer: pl.Trainer) -> None:
    """Raise unless the epoch loop counts micro-batches in ``batch_progress.current`` and ``.total`` as expected.

    Examples:
        >>> require_batch_counter_support(pl.Trainer(logger=False, enable_checkpointing=False))
    """
    progress = getattr(trainer.fit_loop.epoch_loop, "batch_progress", None)
    missing = [
        f"batch_progress.{part}.{name}"
        for part in ("current", "total")
        for name in _COUNTERS
        if not isinstance(getattr(getattr(progress, part, None), name, None), int)
    ]
    if missing:
        fix = f"Install {SUPPORTED}, or resume with the saved num_replicas, accumulate_grad_batches, micro_batch_size."
        raise RuntimeError(_missing_message("Resuming under another split", missing, fix))


def shift_batch_counters(trainer: pl.Trainer, saved: int, resumed: int) -> None:
    """Make the resumed epoch's micro-batch counters say ``resumed`` where the checkpoint says ``saved``.

    A checkpoint counts the micro-batches of its own split (``batch_progress``, restored before ``on_train_start``);
    under another split the same optimizer steps are another number of micro-batches. Every counter of the epoch
    (``current``) and of the fit (``total``) moves by the same amount, so Lightning's restart logic, which compares
    them, reads the same stage; the optimizer-step counters (``global_step``, ``_batches_that_stepped``, the
    schedulers') count steps and stay. Call it before the epoch loop resets (``on_train_start``).

    Examples:
        >>> trainer = pl.Trainer(logger=False, enable_checkpointing=False)
        >>> trainer.fit_loop.epoch_loop.batch_progress.current.ready = 8  # 2 steps of K=4 ...
        >>> shift_batch_counters(trainer, saved=8, resumed=2)  # ... are 2 steps of K=1
        >>> trainer.fit_loop.epoch_loop.batch_progress.current.ready
        2
    """
    require_batch_counter_support(trainer)
    progress = trainer.fit_loop.epoch_loop.batch_progress
    if progress.current.ready != saved:
        raise RuntimeError(
            f"Cannot resume under another split: the checkpoint's loader delivered {saved} micro-batches of the epoch "
            f"but Lightning's epoch loop counted {progress.current.ready}. Resume with the saved num_replicas, "
            "accumulate_grad_batches and micro_batch_size."
        )
    for tracker in (progress.current, progress.total):
        for name in _COUNTERS:
            setattr(tracker, name, getattr(tracker, name) + resumed - saved)


def requeue_signal(trainer: pl.Trainer) -> int | None:
    """The signal on which Lightning saves an HPC checkpoint and requeues the Slurm job, or ``None`` when the fit's
    cluster environment is not ``SLURMEnvironment(auto_requeue=True)`` (read from ``_accelerator_connector``).

    Examples:
        >>> requeue_signal(pl.Trainer(logger=False, enable_checkpointing=False)) is None  # outside Slurm
        True
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment

    connector = getattr(trainer, "_accelerator_connector", None)
    if connector is None or not hasattr(connector, "cluster_environment"):
        raise RuntimeError(
            _missing_message(
                "StepBoundaryRequeue",
                ["Trainer._accelerator_connector.cluster_environment"],
                f"Install {SUPPORTED}.",
            )
        )
    environment = connector.cluster_environment
    if not isinstance(environment, SLURMEnvironment) or not environment.auto_requeue:
        return None
    return int(environment.requeue_signal)
