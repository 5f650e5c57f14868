"""``SampleCountRescaler``: the Lightning callback that translates Lightning's hooks into weighting-engine calls."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_accum.continuation import Continuation
from lightning_accum.counting import item_mean, masked_sum_and_count
from lightning_accum.data.checks import warn_about_train_data
from lightning_accum.data.loader import is_padding
from lightning_accum.engines import ENGINES, WeightingEngine
from lightning_accum.evaluation import EvaluationMeans
from lightning_accum.fit_binding import FitBinding
from lightning_accum.lightning_internals import resumed_mid_epoch, upcoming_batches, window_ends_epoch
from lightning_accum.logged import WindowLogger
from lightning_accum.module_checks import warn_about_batch_statistics
from lightning_accum.resume import gather_partial_window
from lightning_accum.run import Run
from lightning_accum.support import require_one_optimizer, require_supported_fit


class SampleCountRescaler(Callback):
    """Make each optimizer step's gradient the mean over all counted items of its window, on every rank.

    The window is every micro-batch since the last optimizer step. ``training_step`` returns
    ``self.sample_loss(losses, mask)`` (manual optimization: calls ``self.sample_backward(losses, mask)``; see
    ``SampleCountMixin``). ``mode="deferred"`` (default) all-reduces the window's totals once per step and
    rescales the gradients in one fused multiply, after AMP unscaling and before clipping. ``mode="lookahead"``
    reads a window's batches ahead (up to ``K - 1``, held on the host), counts them with ``count_items``, and
    scales each micro-batch loss exactly. Items count when a backward carries them; a window with no counted
    item makes no update (``global_step`` still advances). Logs per step ``loss_name`` (the window's item-mean
    loss) and ``items_name`` (its item count), per epoch ``epoch_loss_name`` (the item-weighted epoch mean).

    Args:
        loss_name: key of the per-step item-mean loss.
        items_name: key of the per-step global item count.
        epoch_loss_name: key of the epoch's item-weighted mean loss.
        val_loss_name: key of the validation set's item-weighted mean of ``sample_loss`` (all ranks).
        test_loss_name: key of the test set's item-weighted mean of ``sample_loss`` (all ranks).
        prog_bar: show the per-step loss on the progress bar.
        mode: ``"deferred"`` or ``"lookahead"``.
        count_items: look-ahead only: ``count_items(batch) -> Tensor``, the number of items the loss mask
            counts in a batch as ``training_step`` receives it; ``None`` uses the module's ``count_items``.

    Examples:

        >>> import lightning.pytorch as pl
        >>> from lightning_accum.demos import MLPModel, RegressionDataModule
        >>> data = RegressionDataModule(num_samples=10, num_val_samples=3, num_features=4, micro_batch_size=3)
        >>> trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[SampleCountRescaler()],
        ...                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False, limit_val_batches=0)
        >>> trainer.fit(MLPModel(in_features=4, out_features=1, task="regression"), datamodule=data)
        >>> trainer.callback_metrics["train/items"]  # the last window: micro-batches of 3 and 1 samples
        tensor(4.)
    """

    def __init__(
        self,
        loss_name: str = "train/loss",
        items_name: str = "train/items",
        epoch_loss_name: str = "train/loss_epoch",
        prog_bar: bool = True,
        mode: Literal["deferred", "lookahead"] = "deferred",
        count_items: Callable[[Any], Tensor] | None = None,
        val_loss_name: str = "val/item_loss",
        test_loss_name: str = "test/item_loss",
    ) -> None:
        self._logger = WindowLogger(loss_name, items_name, epoch_loss_name, prog_bar)
        self.evaluation = EvaluationMeans(val_loss_name, test_loss_name)  # sample_loss outside training
        if mode not in ENGINES:
            raise ValueError(f"`mode` must be one of {tuple(ENGINES)}, got {mode!r}.")
        if count_items is not None and mode != "lookahead":
            raise ValueError("`count_items` is only used with mode='lookahead'.")
        self.loss_name = loss_name
        self.items_name = items_name
        self.epoch_loss_name = epoch_loss_name
        self.prog_bar = prog_bar
        self.mode = mode
        self.count_items = count_items
        self._engine = ENGINES[mode]()
        self._fit = FitBinding()  # the fit this callback serves, and whether its hooks ran for the loop's batch
        self._continuation = Continuation()  # what a checkpoint trained, checked against what a resume runs

    @property
    def engine(self) -> WeightingEngine:
        """The weighting engine of the fit (observers such as ``GradientNoiseScale`` attach to it)."""
        return self._engine

    @property
    def state_key(self) -> str:
        return self._generate_state_key(loss_name=self.loss_name, items_name=self.items_name)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module._sample_count_rescaler = self  # what sample_loss reaches, without scanning the callbacks
        if stage != "fit":
            return
        require_supported_fit(trainer, pl_module, self.mode, type(self))
        # Before Lightning restores a checkpoint's state into this callback.
        self._engine.begin_fit(Run.of_fit(trainer, pl_module, self.count_items))
        self._logger.load_state_dict({"epoch_items": 0})
        self._fit.reset()
        self._continuation = Continuation()
        # First in the list, so that every other callback's on_before_optimizer_step (clipping, gradient-norm
        # logging) sees the exact gradient, whatever order the user gave; the module's own hook runs after all.
        trainer.callbacks.remove(self)
        trainer.callbacks.insert(0, self)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        require_one_optimizer(trainer, pl_module)
        self._fit.bind(trainer, self._engine.stepped_unfinished)
        self._logger.start_fit(pl_module.device)
        warn_about_train_data(trainer.train_dataloader, resumed_mid_epoch(trainer), trainer.world_size)
        self._continuation.start_fit(trainer, self._engine, self._fit.params())  # a resume continues, or refuses

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if getattr(pl_module, "_sample_count_rescaler", None) is self:
            pl_module._sample_count_rescaler = None
        if stage != "fit":
            return
        self._continuation.fit_ended(trainer)
        self._fit.unbind()

    def micro_batch_loss(
        self, pl_module: pl.LightningModule, losses: Tensor, mask: Tensor | None, weight: Tensor | None = None
    ) -> Tensor:
        """The loss to backpropagate for one micro-batch's per-item ``losses`` (what ``sample_loss`` returns)."""
        if not self._fit.active:  # the Tuner's loop (lr_find, scale_batch_size): as without the rescaler
            return item_mean(losses, mask, weight)
        return self._engine.micro_batch_loss(*masked_sum_and_count(losses, mask, weight), weighted=weight is not None)

    def batch_loss(self, term: Tensor) -> Tensor:
        """The loss to backpropagate for a per-micro-batch ``term`` (what ``batch_loss`` returns in training)."""
        return self._engine.batch_term(term) if self._fit.active else term

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        first = self._fit.start_batch(trainer)
        if first:  # the module's start hooks have set its layers' modes
            warn_about_batch_statistics(pl_module)
        self._continuation.start_batch(trainer, self._engine.run, batch_idx, first)
        padding = partial(is_padding, trainer.train_dataloader)  # the loader marks its padding micro-batches
        self._engine.start_micro_batch(batch_idx, batch, partial(upcoming_batches, trainer, batch_idx), padding)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.evaluation.start_batch(trainer.val_dataloaders, batch_idx, dataloader_idx)

    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.evaluation.start_batch(trainer.test_dataloaders, batch_idx, dataloader_idx)

    def on_before_zero_grad(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._engine.forget_window()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._engine.check_backward(loss)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        ends_epoch = self._engine.run.automatic and window_ends_epoch(trainer)
        finished = self._engine.finish_window(
            self._fit.params(optimizer), ends_epoch, float(trainer.num_training_batches)
        )
        self._logger.log(pl_module, finished)

    def state_dict(self) -> dict[str, Any]:
        """The engine's constants, the epoch's loss totals and, for a checkpoint inside a window, the window.

        Lightning keeps no accumulated gradients in its checkpoints. When a checkpoint lands inside a window
        (default mode), every rank's window totals and partial gradients are gathered into it, so a resumed
        fit continues the window exactly; at step boundaries nothing is added.
        """
        trainer = self._fit.trainer
        return {
            **self._engine.state_dict(),
            **self._logger.state_dict(),
            **self._continuation.state_dict(trainer, self._engine.run.accumulate_grad_batches),
            "window": None if trainer is None else gather_partial_window(trainer, self._engine, self._fit.params()),
        }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._continuation.load(checkpoint, checkpoint.get("callbacks", {}).get(self.state_key, {}))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._engine.load_state_dict(state_dict)
        self._logger.load_state_dict(state_dict)
        self._continuation.window = state_dict.get("window")
