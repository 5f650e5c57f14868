"""Fits for the precision, look-ahead and manual-optimization tests (module level, picklable for ddp_spawn)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.plugins import MixedPrecision
from lightning_cases import Case, ExactModule, NaiveModule, make_micro_batch, make_net, make_optimizer, planned_trainer
from reference import flat_parameters, item_losses, relative_distance, train_reference
from torch import nn

from lightning_accum import SampleCountRescaler

# Unit roundoff (half the machine epsilon) of each format.
UNIT_ROUNDOFF = {
    "32-true": 2.0**-24,
    "16-mixed": 2.0**-11,
    "bf16-mixed": 2.0**-8,
    "16-true": 2.0**-11,
    "bf16-true": 2.0**-8,
}


def fp16_scaler_plugin(init_scale: float = 2.0**10, backoff_factor: float = 0.5, growth_interval: int = 2000):
    """Real fp16 autocast with a GradScaler on CPU (``precision="16-mixed"`` alone falls back to bf16 there)."""
    scaler = torch.amp.GradScaler(
        "cpu", init_scale=init_scale, backoff_factor=backoff_factor, growth_interval=growth_interval
    )
    return MixedPrecision("16-mixed", "cpu", scaler=scaler)


def precision_kwargs(precision: str) -> dict[str, Any]:
    """Trainer arguments for ``precision``; ``"16-mixed"`` means fp16 autocast with dynamic loss scaling."""
    if precision == "16-mixed":
        return {"plugins": [fp16_scaler_plugin()]}
    return {"precision": precision}


def count_case_items(batch) -> torch.Tensor:
    """The count rule of the test micro-batches ``(x, y, mask)``: the mask's ``True`` items, or all items."""
    _, y, mask = batch
    return torch.tensor(y.numel()) if mask is None else mask.bool().sum()


class CountingModule(ExactModule):
    """``ExactModule`` that also states its count rule, for ``SampleCountRescaler(mode="lookahead")``."""

    def count_items(self, batch) -> torch.Tensor:
        return count_case_items(batch)


def fit(
    case: Case,
    module: pl.LightningModule,
    callbacks: list[pl.Callback],
    strategy: str = "auto",
    devices: int = 1,
    logger: pl.loggers.Logger | bool = False,
    ckpt_path: str | Path | None = None,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    callbacks = list(callbacks)
    accumulate = 1
    if isinstance(case.accumulation, int):
        accumulate = case.accumulation
    else:
        callbacks.append(GradientAccumulationScheduler(scheduling=case.accumulation))
    if getattr(module, "automatic_optimization", True):
        trainer_kwargs.setdefault("accumulate_grad_batches", accumulate)
        trainer_kwargs.setdefault(
            "gradient_clip_val", case.clip_norm if case.clip_norm is not None else case.clip_value
        )
        trainer_kwargs.setdefault("gradient_clip_algorithm", "value" if case.clip_value is not None else "norm")
    trainer = planned_trainer(case, callbacks, strategy, devices, logger, **trainer_kwargs)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def fit_net(
    case: Case, kind: str, precision: str = "32-true", mode: str = "deferred", strategy: str = "auto", devices: int = 1
) -> nn.Module:
    """Fit ``make_net()`` on ``case``; ``kind`` is "exact" (with the rescaler in ``mode``) or "naive"."""
    if kind == "naive":
        module, callbacks = NaiveModule(make_net(), case), []
    else:
        module, callbacks = CountingModule(make_net(), case), [SampleCountRescaler(mode=mode)]
    fit(case, module, callbacks, strategy=strategy, devices=devices, **precision_kwargs(precision))
    return module.net


def reference_distance(case: Case, net: nn.Module, skip_windows: tuple[int, ...] = ()) -> float:
    """Relative distance of ``net`` to the float32 reference; windows in ``skip_windows`` make no step."""
    windows = case.reference_windows()
    windows = [[] if i in skip_windows else w for i, w in enumerate(windows)]
    reference = train_reference(
        make_net(), windows, make_optimizer(case.optimizer, case.lr), case.clip_norm, case.clip_value
    ).parameters
    return relative_distance(flat_parameters(net).float(), reference, flat_parameters(make_net()))


def masked_tokens_case(epochs: int = 3) -> Case:
    """One rank, per-token masks (one micro-batch counts nothing), K=3, clipping; three windows per epoch."""
    sizes = [7, 1, 4, 2, 6, 1, 3]
    plan = [make_micro_batch(n, seed=i, tokens=5, keep=0.5) for i, n in enumerate(sizes)]
    x, y, mask = plan[1]
    plan[1] = (x, y, torch.zeros_like(mask))
    return Case(plan=[plan], accumulation=3, epochs=epochs, clip_norm=0.5)


class ManualModule(CountingModule):
    """Manual optimization: ``sample_backward`` per micro-batch, a step after every ``case.k_at(epoch)``
    micro-batches and at the epoch's last one; clipping (if any) after the rescale, in ``on_before_optimizer_step``.
    """

    def __init__(self, net: nn.Module, case: Case) -> None:
        super().__init__(net, case)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx: int) -> None:
        losses, _ = item_losses(self.net, batch)
        self.sample_backward(losses, mask=batch[2])
        if (batch_idx + 1) % self.case.k_at(self.current_epoch) == 0 or self.trainer.is_last_batch:
            optimizer = self.optimizers()
            optimizer.step()
            optimizer.zero_grad()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.case.clip_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.case.clip_norm, gradient_clip_algorithm="norm")


def fit_manual_net(case: Case, precision: str = "32-true", strategy: str = "auto", devices: int = 1) -> nn.Module:
    module = ManualModule(make_net(), case)
    fixed = Case(plan=case.plan, accumulation=1, epochs=case.epochs)  # the module steps on its own schedule
    fit(fixed, module, [SampleCountRescaler()], strategy=strategy, devices=devices, **precision_kwargs(precision))
    return module.net


def tolerance(precision: str, case: Case) -> float:
    """Allowed relative distance to the float32 reference: a rounding budget from the unit roundoff ``u``.

    A budget, not a proven bound (rounding also grows with reduction lengths and compounds through the
    optimizer's state); measured errors sit 3.5 to 5 times inside it. Mixed precision keeps float32
    parameters and optimizer state; only the products of the forward and backward take operands rounded to
    the format (two operands, forward and backward): a relative ``4u`` per step's gradient, and so per update. True half
    precision also stores the parameters in the format: the initial values and each of the ``S`` updates
    are rounded by ``u |theta|``; as independent roundings they add up like a random walk, so the extra
    relative error is ``2 sqrt(S + 1) u |theta| / |theta - theta_0|`` (factor 2 as margin). float32: 1e-5.
    """
    if precision in ("32-true", "64-true"):  # the float32 reference's own rounding bounds the distance
        return 1e-5
    u = UNIT_ROUNDOFF[precision]
    if precision.endswith("mixed"):
        return 4 * u
    windows = case.reference_windows()
    reference = train_reference(
        make_net(), windows, make_optimizer(case.optimizer, case.lr), case.clip_norm, case.clip_value
    ).parameters
    ratio = float(reference.norm() / (reference - flat_parameters(make_net())).norm())
    return 4 * u + 2 * (len(windows) + 1) ** 0.5 * u * ratio


def empty_windows_case() -> Case:
    """Six micro-batches, K=2, AdamW: window 2 of each epoch counts no item (6 windows, 4 steps)."""
    sizes, keeps = [3, 2, 4, 1, 5, 2], [0.6, 0.6, 0.0, 0.0, 0.6, 0.6]
    plan = [make_micro_batch(n, seed=i, tokens=3, keep=p) for i, (n, p) in enumerate(zip(sizes, keeps, strict=True))]
    return Case(plan=[plan], accumulation=2, epochs=2, optimizer="adamw", lr=0.05)
