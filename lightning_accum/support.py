"""Which strategies and precision plugins the rescaler is verified with; everything else fails at setup.

Sharded data parallelism is verified with ``FSDPStrategy`` (FSDP1) and ``ModelParallelStrategy`` (FSDP2,
``fully_shard`` over the data-parallel mesh, ``tensor_parallel_size=1``), at ``precision="32-true"`` and
``"bf16-mixed"``. Every data-parallel strategy here averages gradients over all ranks, so the ``R`` of the
rescale factor is ``trainer.world_size``, and ``trainer.strategy.reduce`` sums the counts over the same ranks.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.plugins.precision import (
    DoublePrecision,
    FSDPPrecision,
    HalfPrecision,
    MixedPrecision,
    Precision,
)
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
    Strategy,
    XLAStrategy,
)

from lightning_accum.lightning_internals import (
    ddp_static_graph,
    require_lookahead_support,
    require_loop_support,
    tensor_parallel_size,
)
from lightning_accum.mixin import SampleCountMixin

SHARDED_STRATEGIES: tuple[type[Strategy], ...] = (FSDPStrategy, ModelParallelStrategy)
SUPPORTED_STRATEGIES: tuple[type[Strategy], ...] = (SingleDeviceStrategy, DDPStrategy, *SHARDED_STRATEGIES)
# Subclasses of the above that own the optimizer step or run elsewhere; none is verified.
UNVERIFIED_SUBCLASSES: tuple[type[Strategy], ...] = (DeepSpeedStrategy, XLAStrategy, SingleDeviceXLAStrategy)
SUPPORTED_PRECISIONS: tuple[type[Precision], ...] = (
    Precision,
    DoublePrecision,
    MixedPrecision,
    HalfPrecision,
    FSDPPrecision,
)
SHARDED_PRECISIONS = ("32-true", "bf16-mixed")  # verified under the sharded strategies

WHAT_WORKS = (
    "a single device, strategy='ddp' / 'ddp_spawn' (either mode, any precision), FSDPStrategy or "
    "ModelParallelStrategy(tensor_parallel_size=1) with fully_shard (either mode, precision='32-true' or "
    "'bf16-mixed')"
)


def shards_gradients(strategy: Strategy) -> bool:
    """True under FSDP (either version): each rank holds a shard of every gradient, not the whole of it.

    Examples:
        >>> from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy
        >>> shards_gradients(FSDPStrategy()), shards_gradients(SingleDeviceStrategy("cpu"))
        (True, False)
    """
    return isinstance(strategy, SHARDED_STRATEGIES)


def require_supported_strategy(strategy: Strategy) -> None:
    """Raise unless the rescale can see the summed gradients of ``strategy`` before its optimizer step.

    Examples:
        >>> from lightning.pytorch.strategies import SingleDeviceStrategy
        >>> require_supported_strategy(SingleDeviceStrategy("cpu"))
    """
    name = type(strategy).__name__
    if not isinstance(strategy, SUPPORTED_STRATEGIES) or isinstance(strategy, UNVERIFIED_SUBCLASSES):
        raise RuntimeError(
            f"SampleCountRescaler does not support the {name} strategy yet: it must see the summed gradients "
            f"before the optimizer step, and is only verified where it does. Use {WHAT_WORKS}."
        )
    if not shards_gradients(strategy):
        return
    tensor_parallel = tensor_parallel_size(strategy)
    if tensor_parallel != 1:
        raise RuntimeError(
            f"SampleCountRescaler is not verified with tensor parallelism ({name} with tensor_parallel_size="
            f"{tensor_parallel}): ranks of a tensor-parallel group see the same items. Use "
            "ModelParallelStrategy(data_parallel_size=<number of devices>, tensor_parallel_size=1) with fully_shard "
            "over device_mesh['data_parallel']."
        )
    sharding = getattr(getattr(strategy, "sharding_strategy", None), "name", "")
    if "HYBRID" in sharding:
        raise RuntimeError(
            f"SampleCountRescaler is not verified with FSDP's {sharding} (gradients averaged in two stages over "
            "two process groups). Use sharding_strategy='FULL_SHARD', 'SHARD_GRAD_OP' or 'NO_SHARD'."
        )
    precision = getattr(strategy.precision_plugin, "precision", None)
    if precision not in SHARDED_PRECISIONS:
        raise RuntimeError(
            f"SampleCountRescaler is not verified with {name} at precision={precision!r}. Use precision='32-true' "
            "or 'bf16-mixed' with it, or strategy='ddp' for the other precisions."
        )


def largest_accumulation(trainer: pl.Trainer) -> int:
    """The largest K of the fit: the Trainer's, or the largest of a ``GradientAccumulationScheduler``'s schedule.

    Examples:
        >>> trainer = pl.Trainer(callbacks=[GradientAccumulationScheduler({0: 1, 2: 4})], logger=False,
        ...                      enable_checkpointing=False)
        >>> largest_accumulation(trainer)
        4
    """
    scheduled = [
        factor
        for callback in trainer.callbacks
        if isinstance(callback, GradientAccumulationScheduler)
        for factor in callback.scheduling.values()
    ]
    return max([trainer.accumulate_grad_batches, *scheduled])


def require_no_static_graph_accumulation(trainer: pl.Trainer) -> None:
    """Raise under ``DDPStrategy(static_graph=True)`` with accumulation (any K > 1, scheduled too).

    Lightning skips DDP's gradient sync (``no_sync``) on a window's first K - 1 micro-batches, which a static
    graph does not allow: PyTorch's reducer stops with an internal assert (``expect_autograd_hooks_``) at the
    window's last backward, with or without the rescaler.

    Examples:
        >>> from lightning.pytorch.strategies import DDPStrategy
        >>> trainer = pl.Trainer(strategy=DDPStrategy(static_graph=True), accumulate_grad_batches=2, logger=False,
        ...                      enable_checkpointing=False)
        >>> require_no_static_graph_accumulation(trainer)
        Traceback (most recent call last):
        ...
        RuntimeError: DDPStrategy(static_graph=True) cannot accumulate gradients (K=2): ...
    """
    k = largest_accumulation(trainer)
    if k > 1 and ddp_static_graph(trainer.strategy):
        raise RuntimeError(
            f"DDPStrategy(static_graph=True) cannot accumulate gradients (K={k}): Lightning skips DDP's gradient "
            "sync on the first K - 1 micro-batches of each window, which a static graph does not allow (PyTorch's "
            "reducer fails with an internal assert). Use DDPStrategy(static_graph=False) (the default, "
            "strategy='ddp'), or accumulate_grad_batches=1 without a GradientAccumulationScheduler."
        )


def require_supported_precision(plugin: Precision) -> None:
    """Raise unless ``plugin`` is one of Lightning's 64/32-true, 16/bf16-mixed, 16/bf16-true or FSDP plugins.

    Examples:
        >>> from lightning.pytorch.plugins.precision import HalfPrecision
        >>> require_supported_precision(HalfPrecision("bf16-true"))
    """
    if type(plugin) not in SUPPORTED_PRECISIONS:
        raise RuntimeError(
            f"SampleCountRescaler is not verified with the {type(plugin).__name__} precision plugin. Use "
            "precision='32-true', '64-true', '16-mixed', 'bf16-mixed', '16-true' or 'bf16-true'."
        )


def require_supported_fit(
    trainer: pl.Trainer, pl_module: pl.LightningModule, mode: str, rescaler_type: type[pl.Callback]
) -> None:
    """Raise, naming the fix, unless a ``rescaler_type`` callback in ``mode`` can make this fit's steps exact.

    Exactly one rescaler, a module with ``SampleCountMixin``, automatic optimization for look-ahead mode, a
    verified strategy and precision, and the Lightning internals the mode reads.
    """
    rescalers = [cb for cb in trainer.callbacks if isinstance(cb, rescaler_type)]
    if len(rescalers) > 1:
        raise RuntimeError(
            f"Found {len(rescalers)} SampleCountRescaler callbacks; each would rescale the gradients. "
            "Keep exactly one in Trainer(callbacks=[...])."
        )
    name = type(pl_module).__name__
    if not isinstance(pl_module, SampleCountMixin):
        raise TypeError(
            f"SampleCountRescaler needs the LightningModule to inherit SampleCountMixin, but {name} does not. "
            f"Declare it as `class {name}(SampleCountMixin, L.LightningModule)` and return "
            "`self.sample_loss(losses, mask)` from training_step."
        )
    if mode == "lookahead" and not pl_module.automatic_optimization:
        raise RuntimeError(
            "SampleCountRescaler(mode='lookahead') needs automatic optimization, where Lightning decides "
            f"the windows; {name} sets `automatic_optimization = False`. Use the "
            "default mode with `self.sample_backward(losses, mask)` in your training_step."
        )
    require_supported_strategy(trainer.strategy)
    if pl_module.automatic_optimization:
        require_no_static_graph_accumulation(trainer)
    require_supported_precision(trainer.precision_plugin)
    require_loop_support()
    if mode == "lookahead":
        require_lookahead_support(trainer)


def require_one_optimizer(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Raise unless the module configures exactly one optimizer (a window of items serves one step)."""
    if len(trainer.optimizers) != 1:
        raise RuntimeError(
            f"SampleCountRescaler needs exactly one optimizer, {type(pl_module).__name__} configures "
            f"{len(trainer.optimizers)}: one window of items cannot serve several optimizer steps."
        )
