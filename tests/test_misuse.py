"""Every misuse fails loudly at setup or the first step, with a message that names the fix."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning_cases import Case, ExactModule, NaiveModule, make_micro_batch, make_net
from precision_cases import CountingModule
from reference import MicroBatch, item_losses

from lightning_accum import GlobalBatchSampler, SampleCountRescaler


def small_case() -> Case:
    return Case(plan=[[make_micro_batch(n, seed=i, tokens=3, keep=0.5) for i, n in enumerate([3, 2, 4])]])


def fit(module: pl.LightningModule, callbacks: list[pl.Callback], **trainer_kwargs) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        **trainer_kwargs,
    )
    trainer.fit(module)


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
        self.sample_loss(losses.detach() + 1.0, mask)  # e.g. a second loss computed for logging
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


def test_scalar_mean_passed_as_losses() -> None:
    with pytest.raises(ValueError, match=r"0-dim.*reduction='none'"):
        fit(ScalarMeanModule(make_net(), small_case()), callbacks=[SampleCountRescaler()])


def test_mask_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"mask has shape \(3, 1\) but losses have shape \(3, 3\)"):
        fit(WrongMaskShapeModule(make_net(), small_case()), callbacks=[SampleCountRescaler()])


def test_mask_that_is_not_zero_one() -> None:
    with pytest.raises(RuntimeError, match="mask must be bool or hold only 0 and 1"):
        fit(WeightMaskModule(make_net(), small_case()), callbacks=[SampleCountRescaler()])


def test_training_step_returning_a_mean_instead_of_sample_loss() -> None:
    with pytest.raises(RuntimeError, match=r"did not come from self.sample_loss"):
        fit(MeanReturningModule(make_net(), small_case()), callbacks=[SampleCountRescaler()])


def test_manual_optimization() -> None:
    with pytest.raises(RuntimeError, match=r"uses manual optimization: call `self.sample_backward\(losses, mask\)`"):
        fit(ManualModule(make_net(), small_case()), callbacks=[SampleCountRescaler()])


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
    "module_class",
    [RegularizedModule, WeightedHeadsModule, CountedButNotReturnedModule],
    ids=["added", "weighted", "left_out"],
)
def test_loss_other_than_the_sum_of_sample_loss_outputs(module_class) -> None:
    with pytest.raises(
        RuntimeError, match=r"more or less than the sum of its self.sample_loss.*item_losses \+ penalty"
    ):
        fit(module_class(make_net(), small_case()), callbacks=[SampleCountRescaler()], accumulate_grad_batches=2)


def test_count_rule_returning_per_sample_counts() -> None:
    with pytest.raises(ValueError, match=r"one count for the whole batch.*got shape \(3,\).*mask.sum\(\)"):
        fit(PerSampleCountModule(make_net(), small_case()), callbacks=[SampleCountRescaler(mode="lookahead")])


def test_global_sampler_built_for_another_k() -> None:
    with pytest.raises(ValueError, match=r"built for K=2 on 1 rank\(s\) as rank 0, but the Trainer runs K=3"):
        fit(StaleSamplerModule(make_net(), small_case()), callbacks=[SampleCountRescaler()], accumulate_grad_batches=3)
