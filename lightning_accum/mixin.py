"""``SampleCountMixin``: gives a LightningModule ``sample_loss`` for per-item losses."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_accum.counting import item_mean
from lightning_accum.segments import document_losses


class MissingRescalerError(RuntimeError):
    """``sample_loss`` or ``sample_backward`` ran in a fit without a ``SampleCountRescaler`` in its callbacks."""


class SampleCountMixin:
    """Mix into a ``LightningModule`` (before it) to return item-weighted losses from ``training_step``.

    ``sample_loss(losses, mask)`` takes one loss per item (any shape) and an optional mask of the items
    that count. During training it hands them to the Trainer's ``SampleCountRescaler``, which makes
    each optimizer step use the mean over all counted items of the window on all ranks. Outside
    training (validation, test) it returns the plain mean over the counted items of the batch (``nan`` when
    none counts).
    With manual optimization, ``sample_backward(losses, mask)`` replaces ``self.manual_backward(loss)``.
    ``SampleCountRescaler(mode="lookahead")`` counts batches ahead with ``count_items(batch)``.

    Examples:

        >>> import torch, torch.nn.functional as F
        >>> import lightning.pytorch as pl
        >>> from lightning_accum import SampleCountRescaler
        >>> class Model(SampleCountMixin, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Linear(3, 1)
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return self.sample_loss(F.mse_loss(self.net(x), y, reduction="none"))
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> data = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.randn(10, 1))
        >>> trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[SampleCountRescaler()],
        ...                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False)
        >>> trainer.fit(Model(), torch.utils.data.DataLoader(data, batch_size=3))
        >>> trainer.global_step  # 4 micro-batches of 3, 3, 3, 1 samples in 2 windows
        2
    """

    def sample_loss(
        self,
        losses: Tensor,
        mask: Tensor | None = None,
        weight: Tensor | None = None,
        segments: Tensor | None = None,
    ) -> Tensor:
        """Return the loss that ``training_step`` returns for these per-item ``losses``.

        Return it as is, or a plain sum of several such outputs (any spelling, times one overall factor); an
        added term, outputs weighted against each other, or an output with a graph left out of the backward is
        refused. Several outputs pool into one item mean over the union of their items:
        ``sample_loss(a) + sample_loss(b)`` is not ``mean(a) + mean(b)``; when both score the same items,
        ``sample_loss(loss_a + loss_b, mask)`` is. Items count when a backward pass carries the output, so
        an output that is only logged (or skipped with ``return None``) counts nothing.
        Under DDP every rank calls it in every ``training_step``: the run's first call all-reduces once,
        and a rank that skipped it would leave the others waiting.

        In ``validation_step`` / ``test_step`` it returns the batch's item mean and, with the rescaler in the
        Trainer, logs the whole set's item-weighted mean over all ranks under its ``val_loss_name`` /
        ``test_loss_name`` (``"val/item_loss"``, ``"test/item_loss"``).

        Args:
            losses: one loss per item, any shape (compute it with ``reduction="none"``).
            mask: same shape as ``losses``, bool or 0/1; ``True``/1 marks the items that count.
                ``None`` counts every item.
            weight: same shape as ``losses``, finite non-negative floats: the step's gradient becomes
                ``sum(w * grad(loss)) / sum(w)`` over the window's counted items (a masked item weighs 0).
            segments: same shape as ``losses`` (token losses of packed rows, last dimension the row), integer
                document ids in ``[0, row length)``: each (row, document) becomes one item weighing its mean
                token loss (the per-document mean). Not combined with ``weight``.
        """
        losses, mask = _items(losses, mask, weight, segments)
        trainer = getattr(self, "_trainer", None)
        if trainer is None or not trainer.training:
            rescaler = getattr(self, "_sample_count_rescaler", None)
            return (
                item_mean(losses, mask, weight)
                if rescaler is None
                else rescaler.evaluation.loss(self, losses, mask, weight)
            )
        if not self.automatic_optimization:
            raise RuntimeError(
                f"{type(self).__name__} uses manual optimization: call `self.sample_backward(losses, mask)` "
                "instead of `self.manual_backward(self.sample_loss(losses, mask))`."
            )
        return self._attached_rescaler().micro_batch_loss(self, losses, mask, weight)

    def batch_loss(self, term: Tensor) -> Tensor:
        """Return a per-micro-batch ``term`` (0-dim: an auxiliary loss, a KL, a penalty) to add to ``sample_loss``.

        Its gradient counts as its mean over the window's micro-batches on all ranks (the last, shorter window
        included): ``return self.sample_loss(ce, mask) + 0.01 * self.batch_loss(aux)`` steps on the item mean of
        ``ce`` plus 0.01 times the mean of ``aux`` over the window's micro-batches. Several terms and calls per
        step add up. Needs ``SampleCountRescaler(mode="lookahead")``, which knows the window's micro-batches
        before their backward; the default mode refuses it. Outside training it returns ``term`` as is.
        """
        if not isinstance(term, Tensor) or term.ndim != 0 or not term.is_floating_point():
            raise ValueError(
                f"batch_loss expects a 0-dim floating-point tensor (one value per micro-batch), got "
                f"{getattr(term, 'shape', type(term).__name__)}; per-item losses go to sample_loss."
            )
        trainer = getattr(self, "_trainer", None)
        if trainer is None or not trainer.training:
            return term
        return self._attached_rescaler().batch_loss(term)

    def sample_backward(
        self,
        losses: Tensor,
        mask: Tensor | None = None,
        weight: Tensor | None = None,
        segments: Tensor | None = None,
    ) -> None:
        """Manual optimization: backpropagate these per-item ``losses`` into the current window.

        Replaces ``self.manual_backward(loss)``. The window is every ``sample_backward`` since the last
        ``optimizer.step()`` (of the optimizer from ``self.optimizers()``), on every rank; at that step the
        rescaler turns the accumulated gradient into the window's item mean, after AMP unscaling. Step
        whenever you like; ``optimizer.zero_grad()`` after the step as usual. To clip gradients, call
        ``self.clip_gradients(optimizer, ...)`` in ``on_before_optimizer_step``, which runs after the rescale.
        ``weight`` and ``segments`` as in ``sample_loss``.

        Examples:

            >>> import torch, torch.nn.functional as F
            >>> import lightning.pytorch as pl
            >>> from lightning_accum import SampleCountRescaler
            >>> class Manual(SampleCountMixin, pl.LightningModule):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.automatic_optimization = False
            ...         self.net = torch.nn.Linear(3, 1)
            ...     def training_step(self, batch, batch_idx):
            ...         x, y = batch
            ...         self.sample_backward(F.mse_loss(self.net(x), y, reduction="none"))
            ...         if batch_idx % 2 == 1 or self.trainer.is_last_batch:  # windows of 2 micro-batches
            ...             optimizer = self.optimizers()
            ...             optimizer.step()
            ...             optimizer.zero_grad()
            ...     def configure_optimizers(self):
            ...         return torch.optim.SGD(self.parameters(), lr=0.1)
            >>> data = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.randn(10, 1))
            >>> trainer = pl.Trainer(max_epochs=1, callbacks=[SampleCountRescaler()], logger=False,
            ...                      enable_checkpointing=False, enable_progress_bar=False,
            ...                      enable_model_summary=False)
            >>> trainer.fit(Manual(), torch.utils.data.DataLoader(data, batch_size=3))
            >>> trainer.global_step
            2
        """
        trainer = getattr(self, "_trainer", None)
        if trainer is None or not trainer.training or self.automatic_optimization:
            raise RuntimeError(
                "sample_backward is for training_step with manual optimization (`automatic_optimization = "
                "False`); with automatic optimization return `self.sample_loss(losses, mask)` instead."
            )
        losses, mask = _items(losses, mask, weight, segments)
        self.manual_backward(self._attached_rescaler().micro_batch_loss(self, losses, mask, weight))

    def _attached_rescaler(self) -> Any:
        """The ``SampleCountRescaler`` that attached itself to this module at setup (or an error saying to add one)."""
        rescaler = getattr(self, "_sample_count_rescaler", None)
        if rescaler is None:
            raise MissingRescalerError(
                "sample_loss needs a SampleCountRescaler in the Trainer's callbacks, found none. Use "
                "`Trainer(..., callbacks=[SampleCountRescaler()])`."
            )
        return rescaler

    def count_items(self, batch: Any) -> Tensor:
        """Look-ahead mode: the number of counted items in ``batch``, by the same rule as the loss mask.

        Override it, e.g. ``return (batch["target"] != -100).sum()``; it sees a batch as the dataloader
        yields it and as ``training_step`` receives it. Or pass ``SampleCountRescaler(count_items=...)``.
        """
        raise NotImplementedError(
            f"SampleCountRescaler(mode='lookahead') needs {type(self).__name__}.count_items(batch) (the "
            "number of items the loss mask counts in a batch), or SampleCountRescaler(count_items=...)."
        )


def _items(
    losses: Tensor, mask: Tensor | None, weight: Tensor | None, segments: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """The items to count: the per-item losses and mask as given, or with ``segments`` one per (row, document)."""
    if segments is None:
        return losses, mask
    if weight is not None:
        raise ValueError(
            "sample_loss takes weight or segments, not both: with segments every document weighs the same (its "
            "mean token loss); weight the documents by giving their tokens the mask and no segments, or drop weight."
        )
    return document_losses(losses, mask, segments)
