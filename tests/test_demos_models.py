"""Example models: losses mask padding exactly, and a short fit equals a plain-PyTorch item-mean step."""

from __future__ import annotations

import copy
from functools import partial

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from fits import QUIET_TRAINER
from reference import relative_distance

from lightning_accum import SampleCountRescaler
from lightning_accum.demos import CausalLM, DigitsDataModule, MLPModel, TokenSequenceDataModule


def test_mlp_loss_ignores_padding_samples():
    torch.manual_seed(0)
    dm = DigitsDataModule(micro_batch_size=6, shuffle=False)
    dm.setup()
    model = MLPModel(in_features=64, out_features=10, task="classification", hidden_sizes=[16])
    samples = [dm.train_set[i] for i in range(5)] + [dm.train_set[-1]]
    batch = torch.utils.data.default_collate(samples)
    x, y = dm.train_set.x[:5], dm.train_set.y[:5]
    expected = F.cross_entropy(model.net(x), y)  # plain mean over the 5 real samples
    torch.testing.assert_close(model.training_step(batch, 0), expected)


def test_causal_lm_loss_is_the_token_mean_of_each_unpadded_sequence():
    torch.manual_seed(0)
    dm = TokenSequenceDataModule(micro_batch_size=5, shuffle=False)
    dm.setup()
    lm = CausalLM(len(dm.vocab), pad_id=dm.vocab.pad_id, embed_dim=8, hidden_size=16)
    samples = [dm.train_set[i] for i in range(4)] + [dm.train_set[-1]]
    batch = dm.collate_fn()(samples)
    total, count = 0.0, 0
    for sample in samples[:4]:  # each sequence alone, without padding
        tokens = sample["tokens"]
        logits = lm(tokens[None, :-1])[0]
        total += F.cross_entropy(logits, tokens[1:], reduction="sum")
        count += len(tokens) - 1
    torch.testing.assert_close(lm.training_step(batch, 0), total / count, rtol=1e-5, atol=1e-6)


def test_causal_lm_fit_with_accumulation_and_padding_equals_plain_item_mean_steps(tmp_path, measured):
    torch.manual_seed(0)
    k, steps = 3, 2
    dm = TokenSequenceDataModule(micro_batch_size=4, shuffle=False, sampler="global", accumulate_grad_batches=k)
    dm.setup()
    lm = CausalLM(
        len(dm.vocab), pad_id=dm.vocab.pad_id, embed_dim=8, hidden_size=16, optimizer=partial(torch.optim.SGD, lr=0.5)
    )
    reference = copy.deepcopy(lm)
    initial = torch.cat([p.detach().flatten() for p in lm.parameters()])

    # Plain PyTorch: one step per window of k micro-batches on the mean over all counted tokens.
    batches = list(dm.train_dataloader())[: k * steps]
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    for start in range(0, len(batches), k):
        total, count = 0.0, 0
        for batch in batches[start : start + k]:
            logits = reference(batch["input_ids"])
            losses = F.cross_entropy(logits.transpose(1, 2), batch["targets"], reduction="none")
            total = total + losses[batch["mask"]].sum()
            count += int(batch["mask"].sum())
        optimizer.zero_grad()
        (total / count).backward()
        optimizer.step()

    trainer = pl.Trainer(
        accumulate_grad_batches=k,
        max_steps=steps,
        callbacks=[SampleCountRescaler()],
        limit_val_batches=0,
        **QUIET_TRAINER,
        default_root_dir=tmp_path,
        use_distributed_sampler=False,
    )
    trainer.fit(lm, datamodule=dm)
    fitted = torch.cat([p.detach().flatten() for p in lm.parameters()])
    expected = torch.cat([p.detach().flatten() for p in reference.parameters()])
    assert (expected - initial).norm() / initial.norm() > 1e-2  # the steps moved the parameters
    assert measured(relative_distance(fitted, expected, initial)) < 1e-5
