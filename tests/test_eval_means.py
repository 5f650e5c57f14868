"""Exact validation and test means: ``sample_loss`` in ``validation_step`` / ``test_step`` logs the token-weighted
mean over the whole set under ``val/item_loss`` / ``test/item_loss``, against the plain-PyTorch mean."""

from __future__ import annotations

import pytest
import torch
from cases import make_net
from forms import (
    EvalModule,
    GlobalLoaderEvalModule,
    eval_reference,
    fit_form,
    plan_of,
    weighted_batch,
    weights_case,
)

from lightning_accum import SampleCountRescaler

VAL_PLAN = plan_of(weighted_batch, [[5, 5, 5, 1]], tokens=4)  # a short last batch


def quiet_trainer(**kwargs):
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, **kwargs)  # fmt: skip


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_whole_set_token_mean(stage: str, measured) -> None:
    module = EvalModule(make_net(), weights_case(), VAL_PLAN)
    callback = SampleCountRescaler(val_loss_name="val/exact", test_loss_name="test/exact")
    (logged,) = getattr(quiet_trainer(callbacks=[callback]), stage)(module)
    expected = eval_reference(module.net, VAL_PLAN)
    key = "val/exact" if stage == "validate" else "test/exact"
    assert measured(abs(logged[key] / expected - 1)) <= 1e-6
    # What self.log(on_epoch=True) gives: batch means weighted by batch size, not by counted tokens.
    assert abs(logged["val/batch_mean"] / expected - 1) > 1e-3


def test_in_a_fit_after_the_sanity_check(measured) -> None:
    """The sanity check's batch does not stay in the epoch's mean; the key is ``val/item_loss`` by default."""
    case = weights_case()
    case.epochs = 1
    module = EvalModule(make_net(), case, VAL_PLAN)
    trainer = fit_form(case, module, [SampleCountRescaler()], num_sanity_val_steps=1)
    expected = eval_reference(module.net, VAL_PLAN)
    assert measured(abs(float(trainer.callback_metrics["val/item_loss"]) / expected - 1)) <= 1e-6


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_padding_of_a_global_batch_loader_counts_nothing(stage: str, measured) -> None:
    """Rank 1 of 2 over 5 sequences in micro-batches of 2 gets [2, 3] then a padding micro-batch (sequence 0)."""
    sequences = weighted_batch(5, seed=7, tokens=4)
    module = GlobalLoaderEvalModule(make_net(), weights_case(), sequences, replicas=2, rank=1)
    (logged,) = getattr(quiet_trainer(callbacks=[SampleCountRescaler()]), stage)(module)
    expected = eval_reference(module.net, [[tuple(t[2:4] for t in sequences)]])  # sequences 2 and 3 only
    assert measured(abs(logged[f"{'val' if stage == 'validate' else 'test'}/item_loss"] / expected - 1)) <= 1e-6
    with_padding = eval_reference(module.net, [[tuple(t[2:4] for t in sequences), tuple(t[:1] for t in sequences)]])
    assert abs(with_padding / expected - 1) > 1e-3  # counting the substitute would be visible


def test_without_the_rescaler_it_is_the_batch_mean() -> None:
    module = EvalModule(make_net(), weights_case(), VAL_PLAN)
    losses, mask = torch.tensor([[1.0, 2.0], [3.0, 10.0]]), torch.tensor([[1, 1], [1, 0]])
    assert module.sample_loss(losses, mask=mask).item() == pytest.approx(2.0)


def test_keys_must_differ() -> None:
    with pytest.raises(ValueError, match="must be different non-empty strings"):
        SampleCountRescaler(val_loss_name="x", test_loss_name="x")
