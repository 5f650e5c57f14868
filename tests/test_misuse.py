"""Every misuse fails loudly at setup or the first step, with a message that names the fix."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning_cases import Case, ExactModule, NaiveModule, make_micro_batch, make_net
from reference import MicroBatch, item_losses

from lightning_accum import SampleCountRescaler
from lightning_accum.callback import require_supported_strategy


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


def test_strategy_that_hides_the_gradients() -> None:
    with pytest.raises(RuntimeError, match=r"does not support the FSDPStrategy strategy.*strategy='ddp'"):
        require_supported_strategy(FSDPStrategy())


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
