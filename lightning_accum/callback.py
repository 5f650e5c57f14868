"""``SampleCountRescaler``: the Lightning callback that wires Lightning's hooks to a weighting engine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.autograd.graph import Node
from torch.utils.hooks import RemovableHandle

from lightning_accum.counting import count_dtype, masked_sum_and_count
from lightning_accum.data import WindowSampler
from lightning_accum.data.checks import warn_about_repeated_samples, warn_unless_loaders_resume
from lightning_accum.engines import DeferredEngine, LookaheadEngine, RunState, WeightingEngine, WindowTotals
from lightning_accum.graph import GraphProblem, backward_problem
from lightning_accum.lightning_internals import (
    batch_token,
    require_lookahead_support,
    require_loop_support,
    resumed_mid_epoch,
    upcoming_batches,
    window_ends_epoch,
)
from lightning_accum.lookahead import as_count
from lightning_accum.metrics import ItemMeanLoss
from lightning_accum.mixin import SampleCountMixin
from lightning_accum.resume import gather_partial_window, restore_partial_window
from lightning_accum.support import require_supported_precision, require_supported_strategy

MODES = ("deferred", "lookahead")


class SampleCountRescaler(Callback):
    """Make each optimizer step's gradient the mean over all counted items of its window.

    The window is every micro-batch since the last optimizer step, on every rank. The module's
    ``training_step`` returns ``self.sample_loss(losses, mask)`` (or, with manual optimization, calls
    ``self.sample_backward(losses, mask)``; see ``SampleCountMixin``). Two modes reach the same gradient:

    - ``"deferred"`` (default): per optimizer step one all-reduce of ``[loss sum, item count]`` and one
      fused in-place multiply of the gradients, after AMP unscaling and before gradient clipping.
    - ``"lookahead"``: before a window's first micro-batch, its batches are read ahead (held on the host,
      up to ``K - 1`` of them) and counted with ``count_items`` (or the module's ``count_items``), the
      count is all-reduced once, and every micro-batch loss is scaled exactly. Gradients are left alone
      unless a counted micro-batch never reached a backward. At the step, one more all-reduce checks that
      count against the masks ``sample_loss`` saw and gives the logged loss.

    Items count when a backward pass carries them and are forgotten when Lightning zeroes the gradients, so a
    loss that is never backpropagated counts nothing. A window whose global count is 0 leaves parameters and
    optimizer state untouched (Lightning still counts the step: ``global_step`` and step-interval LR
    schedulers advance). It logs, per optimizer step, ``loss_name`` (the window's global item-mean loss) and
    ``items_name`` (its global item count), and per epoch ``epoch_loss_name`` (the item-weighted mean over the
    epoch, a torchmetrics ``Metric``). A step that fp16 loss scaling skips (inf/nan gradients) still logs
    its window.

    Args:
        loss_name: key of the per-step item-mean loss.
        items_name: key of the per-step global item count.
        epoch_loss_name: key of the epoch's item-weighted mean loss.
        prog_bar: show the per-step loss on the progress bar.
        mode: ``"deferred"`` or ``"lookahead"``.
        count_items: look-ahead only: ``count_items(batch) -> Tensor`` (a 0-dim count) for a batch as the
            dataloader yields it and as ``training_step`` receives it; ``None`` uses the module's
            ``count_items`` method. It must count what the ``sample_loss`` masks count (checked each step).

    Example::

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
    ) -> None:
        names = {"loss_name": loss_name, "items_name": items_name, "epoch_loss_name": epoch_loss_name}
        for arg, name in names.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"`{arg}` must be a non-empty string, got {name!r}.")
        if len(set(names.values())) != len(names):
            raise ValueError(f"loss_name, items_name and epoch_loss_name must differ, got {names}.")
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
        if count_items is not None and mode != "lookahead":
            raise ValueError("`count_items` is only used with mode='lookahead'.")
        self.loss_name = loss_name
        self.items_name = items_name
        self.epoch_loss_name = epoch_loss_name
        self.prog_bar = prog_bar
        self.mode = mode
        self.count_items = count_items
        self._engine: WeightingEngine = LookaheadEngine() if mode == "lookahead" else DeferredEngine()
        # The epoch's item-weighted mean of the per-step global values: already summed over ranks by the step's
        # all-reduce, so the metric does not sync again (and rank 0's state in a checkpoint is the global one).
        self._epoch_loss = ItemMeanLoss(sync_on_compute=False)
        self._outputs: list[Node] = []  # grad_fn of each sample_loss output with a graph since the last backward
        self._calls = 0  # sample_loss calls since the last backward
        self._batch_token: int | None = None  # the fit loop's batch for which this callback's hooks ran
        self._params: list[torch.nn.Parameter] = []  # the optimizer's parameters, in order
        self._trainer: pl.Trainer | None = None
        self._step_hook: RemovableHandle | None = None
        self._window_finished = False  # on_before_optimizer_step ran for the optimizer step being taken
        self._restored_window: dict[str, Any] | None = None  # a mid-window checkpoint's window, until train start

    @property
    def state_key(self) -> str:
        return self._generate_state_key(loss_name=self.loss_name, items_name=self.items_name)

    # ------------------------------------------------------------------ validation and wiring

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._engine.reset()  # before Lightning restores a checkpoint's state into this callback
        self._epoch_loss.reset()
        rescalers = [cb for cb in trainer.callbacks if isinstance(cb, SampleCountRescaler)]
        if len(rescalers) > 1:
            raise RuntimeError(
                f"Found {len(rescalers)} SampleCountRescaler callbacks; each would rescale the gradients. "
                "Keep exactly one in Trainer(callbacks=[...])."
            )
        if not isinstance(pl_module, SampleCountMixin):
            raise TypeError(
                f"SampleCountRescaler needs the LightningModule to inherit SampleCountMixin, but "
                f"{type(pl_module).__name__} does not. Declare it as "
                f"`class {type(pl_module).__name__}(SampleCountMixin, L.LightningModule)` and return "
                "`self.sample_loss(losses, mask)` from training_step."
            )
        if self.mode == "lookahead" and not pl_module.automatic_optimization:
            raise RuntimeError(
                "SampleCountRescaler(mode='lookahead') needs automatic optimization, where Lightning decides "
                f"the windows; {type(pl_module).__name__} sets `automatic_optimization = False`. Use the "
                "default mode with `self.sample_backward(losses, mask)` in your training_step."
            )
        require_supported_strategy(trainer.strategy)
        require_supported_precision(trainer.precision_plugin)
        require_loop_support()
        if self.mode == "lookahead":
            require_lookahead_support(trainer)
        pl_module._sample_count_rescaler = self  # what sample_loss reaches, without scanning the callbacks
        self._batch_token = None
        self._restored_window = None
        # First in the list, so that every other callback's on_before_optimizer_step (clipping, gradient-norm
        # logging) sees the exact gradient, whatever order the user gave; the module's own hook runs after all.
        trainer.callbacks.remove(self)
        trainer.callbacks.insert(0, self)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if getattr(pl_module, "_sample_count_rescaler", None) is self:
            pl_module._sample_count_rescaler = None
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        self._trainer = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise RuntimeError(
                f"SampleCountRescaler needs exactly one optimizer, {type(pl_module).__name__} configures "
                f"{len(trainer.optimizers)}: one window of items cannot serve several optimizer steps."
            )
        self._epoch_loss = self._epoch_loss.set_dtype(count_dtype(pl_module.device)).to(pl_module.device)
        optimizer = trainer.optimizers[0]
        self._trainer = trainer
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        self._step_hook = optimizer.register_step_post_hook(self._require_window_finished)
        warn_about_repeated_samples(trainer.train_dataloader)
        if resumed_mid_epoch(trainer):
            warn_unless_loaders_resume(trainer.train_dataloader)
        if self._restored_window is not None:
            window, self._restored_window = self._restored_window, None
            restore_partial_window(window, trainer, self._engine, self._params)

    def _require_window_finished(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer step post-hook: stop at a step whose window this callback did not finish (a raw optimizer).

        A post-hook, because in 32-bit Lightning runs the closure (and so on_before_optimizer_step) inside
        ``optimizer.step``, after its pre-hooks.
        """
        finished, self._window_finished = self._window_finished, False
        if finished or not self._hooks_active():
            return
        raise RuntimeError(
            "The optimizer stepped without Lightning's on_before_optimizer_step, so SampleCountRescaler could not "
            "make its gradient the item mean (a raw optimizer, e.g. `self.optimizers(use_pl_optimizer=False)`). "
            "Step the LightningOptimizer that `self.optimizers()` returns."
        )

    def _hooks_active(self) -> bool:
        """False while Lightning's Tuner runs the fit loop with its own callbacks in place of this one."""
        return self._trainer is not None and self._batch_token == batch_token(self._trainer)

    def _run_state(self, pl_module: pl.LightningModule) -> RunState:
        trainer = pl_module.trainer
        strategy = trainer.strategy
        return RunState(
            accumulate_grad_batches=trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1,
            world_size=trainer.world_size,
            device=pl_module.device,
            reduce_sum=lambda t: strategy.reduce(t, reduce_op="sum"),
            reduce_mean=lambda t: strategy.reduce(t, reduce_op="mean"),
        )

    # ------------------------------------------------------------------ per micro-batch

    def micro_batch_loss(self, pl_module: pl.LightningModule, losses: Tensor, mask: Tensor | None) -> Tensor:
        """The loss to backpropagate for one micro-batch's per-item ``losses`` (what ``sample_loss`` returns)."""
        loss_sum, items = masked_sum_and_count(losses, mask)
        if not self._hooks_active():
            # Lightning's Tuner (lr_find, scale_batch_size) runs the loop without this callback: it gets the plain
            # item mean of the micro-batch, as from a module without the rescaler.
            return loss_sum / items.clamp_min(1).to(loss_sum.dtype)
        loss = self._engine.micro_batch_loss(loss_sum, items, self._run_state(pl_module))
        self._calls += 1
        if loss.grad_fn is not None:  # one without a graph (no_grad, detached: logging) is never backpropagated
            self._outputs.append(loss.grad_fn)
        return loss

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._outputs, self._calls = [], 0
        self._batch_token = batch_token(trainer)
        if not pl_module.automatic_optimization:
            return
        k = trainer.accumulate_grad_batches
        if batch_idx == 0:
            batch_sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
            if isinstance(batch_sampler, WindowSampler):  # a sampler that forms windows checks its split
                batch_sampler.require_split(k, trainer.world_size, trainer.global_rank)
        if isinstance(self._engine, LookaheadEngine):
            if batch_idx % k == 0:
                self._count_window_ahead(trainer, pl_module, batch, batch_idx)
            self._engine.at_micro_batch(batch_idx, k)

    def _count_window_ahead(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Count this batch and the window's next ones (Lightning also ends an epoch at ``num_training_batches``)."""
        assert isinstance(self._engine, LookaheadEngine)
        count = pl_module.count_items if self.count_items is None else self.count_items
        ahead = int(min(trainer.accumulate_grad_batches - 1, trainer.num_training_batches - batch_idx - 1))
        device = pl_module.device
        counts = [as_count(count(b), device, count_dtype(device)) for b in [batch, *upcoming_batches(trainer, ahead)]]
        self._engine.start_window(torch.stack(counts), self._run_state(pl_module))

    def on_before_zero_grad(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._engine.forget_window()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        name = type(pl_module).__name__
        helper = "sample_loss" if pl_module.automatic_optimization else "sample_backward"
        outputs, self._outputs = self._outputs, []
        calls, self._calls = self._calls, 0
        if not calls:
            raise RuntimeError(
                f"{name} backpropagated a loss that did not come from self.{helper}(...). "
                f"Use `self.{helper}(per_item_losses, mask)` so that SampleCountRescaler can count the items."
            )
        problem = backward_problem(loss, outputs)
        if problem is GraphProblem.NO_GRAPH:
            raise RuntimeError(
                f"{name} backpropagated a loss without an autograd graph: its per-item losses were computed under "
                "torch.no_grad() or detached, so no gradient reaches the parameters. Compute them with gradients "
                f"enabled before self.{helper}(...)."
            )
        if problem is GraphProblem.ADDED_TERM:
            raise RuntimeError(
                f"{name} backpropagated a term that is not a self.{helper}(...) output (e.g. a regulariser added to "
                "the loss), which the rescale would weight as if it were item losses. Put every term into the "
                f"per-item losses (a penalty added to each item's loss averages to itself: "
                f"`self.{helper}(item_losses + penalty, mask)`)."
            )
        if problem is GraphProblem.LEFT_OUT:
            raise RuntimeError(
                f"{name} computed {len(outputs)} self.{helper}(...) outputs with a graph since the last backward but "
                "backpropagated only some of them. Backpropagate the plain sum of all of them, or compute the ones "
                "you only log under torch.no_grad()."
            )

    # ------------------------------------------------------------------ per optimizer step

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        ends_epoch = pl_module.automatic_optimization and window_ends_epoch(trainer)
        run = self._run_state(pl_module)
        totals = self._engine.finish_window(params, run, ends_epoch, float(trainer.num_training_batches))
        self._window_finished = True
        if totals.empty:
            rank_zero_warn(
                f"Optimizer step at global_step={trainer.global_step} saw no counted items on any rank "
                "(every mask was empty): skipped the update, optimizer state left untouched.",
                category=UserWarning,
            )
            # nan, not nothing: Lightning would otherwise re-log the previous step's cached loss.
            self._log_step(pl_module, torch.full_like(totals.items, float("nan")), totals)
            return
        self._log_step(pl_module, totals.loss_sum / totals.items, totals)
        self._epoch_loss.update(totals.loss_sum, totals.items)
        pl_module.log(
            self.epoch_loss_name,
            self._epoch_loss,
            on_step=False,
            on_epoch=True,
            batch_size=1,
            metric_attribute=self.epoch_loss_name,  # the metric is this callback's, not a module attribute
        )

    def _log_step(self, pl_module: pl.LightningModule, loss: Tensor, totals: WindowTotals) -> None:
        log = pl_module.log
        log(self.loss_name, loss.float(), on_step=True, on_epoch=False, prog_bar=self.prog_bar, batch_size=1)
        log(self.items_name, totals.items.float(), on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """The engine's constants, the epoch's loss totals and, for a checkpoint inside a window, the window.

        Lightning keeps no accumulated gradients in its checkpoints. When a checkpoint lands inside a window
        (default mode), every rank's window totals and partial gradients are gathered into it, so a resumed
        fit continues the window exactly; at step boundaries nothing is added.
        """
        return {
            **self._engine.state_dict(),
            "epoch_loss_sum": float(self._epoch_loss.loss_sum),
            "epoch_items": float(self._epoch_loss.items),
            "window": None
            if self._trainer is None
            else gather_partial_window(self._trainer, self._engine, self._params),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._engine.load_state_dict(state_dict)
        self._epoch_loss.reset()
        if state_dict["epoch_items"] > 0:
            self._epoch_loss.loss_sum.fill_(state_dict["epoch_loss_sum"])
            self._epoch_loss.items.fill_(state_dict["epoch_items"])
        self._restored_window = state_dict.get("window")
