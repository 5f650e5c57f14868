"""Every misuse fails loudly at setup or the first step, with a message that names the fix."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from cases import Case, make_micro_batch, make_net
from fits import CountingModule, ExactModule, NaiveModule
from fits import fit as fit_case_module
from reference import MicroBatch, item_losses

from lightning_accum import GlobalBatchSampler, SampleCountRescaler


def small_case() -> Case:
    return Case(plan=[[make_micro_batch(n, seed=i, tokens=3, keep=0.5) for i, n in enumerate([3, 2, 4])]])


def fit(module: ExactModule, callbacks: list[pl.Callback], **trainer_kwargs) -> None:
    fit_case_module(module.case, module, callbacks, **trainer_kwargs)


class ScalarMeanModule(ExactModule):
    def training_step(self, batch: MicroBatch, batch_idx: int) -> torch.Tensor:
        losses, mask = item_losses(self.net, batch)
        return self.sample_loss(losses[mask].mean())


class WrongMaskShapeModule(ExactModule):
    def training_step(self, batch: MicroBatch, batch_idx: int) -> torch.Tensor:
        losses, mask = item_losses(self.net, batch)
        return self.sample_loss(losses, mask=mask[:, :1])


class WeightMaskModule(ExactModule):
    def training_step(self, batch: MicroBatch, batch_idx: int) -> torch.Tensor:
        losses, mask = item_losses(self.net, batch)
        return self.sample_loss(losses, mask=mask.float() * 0.5)


class MeanReturningModule(ExactModule):
    def training_step(self, batch: MicroBatch, batch_idx: int) -> torch.Tensor:
        losses, mask = item_losses(self.net, batch)
        return losses[mask].mean()


class RegularizedModule(ExactModule):
    def training_step(self, batch: MicroBatch, batch_idx: int) -> torch.Tensor:
        losses, mask = item_losses(self.net, batch)
        penalty = sum(p.square().sum() for p in self.net.parameters())
        return self.sample_loss(losses, mask) + 1e-3 * penalty


class WeightedHeadsModule(ExactModule):
    def training_step(self, batch: MicroBatch, batch_idx: int) -> torch.Tensor:
        losses, mask = item_losses(self.net, batch)
        return self.sample_loss(losses[:1], mask[:1]) + 2.0 * self.sample_loss(losses[1:], mask[1:])


class CountedButNotReturnedModule(ExactModule):
    def training_step(self, batch: MicroBatch, batch_idx: int) -> torch.Tensor:
        losses, mask = item_losses(self.net, batch)
        self.sample_loss(losses + 1.0, mask)  # a second loss, with a graph, that the user forgot to add
        return self.sample_loss(losses, mask)


class NoGradLossModule(ExactModule):
    def training_step(self, batch: MicroBatch, batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            losses, mask = item_losses(self.net, batch)
        return self.sample_loss(losses, mask)


class PerSampleCountModule(CountingModule):
    def count_items(self, batch) -> torch.Tensor:
        return batch[2].sum(dim=1)  # one count per sample instead of one for the batch


class StaleSamplerModule(ExactModule):
    """Serves its plan through a GlobalBatchSampler built for K=2, while the Trainer accumulates 3."""

    def train_dataloader(self):
        x, y, mask = self.case.plan[0][0]
        sampler = GlobalBatchSampler(len(x), micro_batch_size=1, accumulate_grad_batches=2, shuffle=False)
        return torch.utils.data.DataLoader(list(zip(x, y, mask, strict=True)), batch_sampler=sampler)


class ManualModule(ExactModule):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.automatic_optimization = False


def test_mixin_without_callback() -> None:
    with pytest.raises(RuntimeError, match=r"callbacks=\[SampleCountRescaler\(\)\]"):
        fit(ExactModule(make_net(), small_case()), callbacks=[])


def test_callback_without_mixin() -> None:
    with pytest.raises(TypeError, match="inherit SampleCountMixin"):
        fit(NaiveModule(make_net(), small_case()), callbacks=[SampleCountRescaler()])


def test_two_rescalers() -> None:
    # Identical instances already clash in Lightning (same state_key); differently named ones reach this check.
    second = SampleCountRescaler(loss_name="a/loss", items_name="a/items", epoch_loss_name="a/loss_epoch")
    with pytest.raises(RuntimeError, match="Keep exactly one"):
        fit(ExactModule(make_net(), small_case()), callbacks=[SampleCountRescaler(), second])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_name": ""}, "`loss_name` must be a non-empty string"),
        ({"items_name": "train/loss"}, "must differ"),
    ],
)
def test_constructor_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SampleCountRescaler(**kwargs)


def test_sample_loss_outside_training_is_the_batch_item_mean() -> None:
    module = ExactModule(make_net(), small_case())
    losses = torch.tensor([[1.0, 2.0], [3.0, 10.0]])
    assert module.sample_loss(losses, mask=torch.tensor([[1, 1], [1, 0]])).item() == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("module_class", "callback_kwargs", "trainer_kwargs", "error", "message"),
    [
        (ScalarMeanModule, {}, {}, ValueError, r"0-dim.*reduction='none'"),
        (WrongMaskShapeModule, {}, {}, ValueError, r"mask has shape \(3, 1\) but losses have shape \(3, 3\)"),
        (WeightMaskModule, {}, {}, RuntimeError, "mask must be bool or hold only 0 and 1"),
        (MeanReturningModule, {}, {}, RuntimeError, r"did not come from self.sample_loss"),
        (ManualModule, {}, {}, RuntimeError, r"uses manual optimization: call `self.sample_backward\(losses, mask\)`"),
        (RegularizedModule, {}, {"accumulate_grad_batches": 2}, RuntimeError,
         r"a term that is not a self.sample_loss\(...\) output.*item_losses \+ penalty"),
        (WeightedHeadsModule, {}, {"accumulate_grad_batches": 2}, RuntimeError,
         r"backpropagated with different weights.*`2 \* self.sample_loss\(a\) \+ self.sample_loss\(b\)`"),
        (CountedButNotReturnedModule, {}, {"accumulate_grad_batches": 2}, RuntimeError,
         r"computed 2 self.sample_loss\(...\) outputs with a graph.*only some of them.*torch.no_grad\(\)"),
        (NoGradLossModule, {}, {}, RuntimeError, r"without an autograd graph.*torch.no_grad\(\) or detached"),
        (PerSampleCountModule, {"mode": "lookahead"}, {}, ValueError,
         r"one count for the whole batch.*got shape \(3,\).*mask.sum\(\)"),
        (StaleSamplerModule, {}, {"accumulate_grad_batches": 3}, ValueError,
         r"built for K=2 on 1 rank\(s\) as rank 0, but the Trainer runs K=3"),
    ],
    ids=["scalar_mean", "mask_shape", "mask_weights", "plain_mean", "manual", "loss_added", "loss_weighted",
         "loss_left_out", "loss_without_graph", "per_sample_counts", "sampler_split"],
)  # fmt: skip
def test_misuse_in_the_module_fails_at_the_first_step(module_class, callback_kwargs, trainer_kwargs, error, message):
    with pytest.raises(error, match=message):
        fit(module_class(make_net(), small_case()), [SampleCountRescaler(**callback_kwargs)], **trainer_kwargs)
