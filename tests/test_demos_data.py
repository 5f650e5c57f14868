"""Example datasets and data modules: sizes, the padding contract, masks and the two samplers."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

from lightning_accum.demos import DigitsDataModule, RegressionDataModule, TokenSequenceDataModule
from lightning_accum.demos.text import stdlib_docstring_lines


def test_regression_sizes_are_not_multiples_of_usual_batch_sizes():
    dm = RegressionDataModule()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (997, 211)
    assert all(len(dm.train_set) % b for b in (2, 4, 8, 16, 32, 64, 128, 256))


def test_regression_targets_follow_a_linear_model():
    dm = RegressionDataModule(noise=0.0, num_samples=50, num_val_samples=5)
    dm.setup()
    x, y = dm.train_set.x, dm.train_set.y
    solution = torch.linalg.lstsq(x, y[:, None]).solution
    torch.testing.assert_close(x @ solution[:, 0], y, rtol=1e-4, atol=1e-4)


def test_digits_are_the_1797_bundled_images_split_without_overlap():
    dm = DigitsDataModule(num_val_samples=297)
    dm.setup()
    digits = load_digits()
    x = torch.cat([dm.train_set.x, dm.val_set.x]) * 16.0
    y = torch.cat([dm.train_set.y, dm.val_set.y])
    assert len(x) == 1797 == len(digits.data)
    expected = sorted(zip(map(tuple, digits.data.tolist()), digits.target.tolist(), strict=True))
    assert sorted(zip(map(tuple, x.tolist()), y.tolist(), strict=True)) == expected


def test_token_batches_pad_with_a_mask_that_matches_the_sequence_lengths():
    dm = TokenSequenceDataModule(micro_batch_size=8, shuffle=False)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    lengths = torch.tensor([len(dm.train_set[i]["tokens"]) - 1 for i in range(8)])
    assert lengths.unique().numel() > 1, "sequences should have different lengths"
    assert batch["mask"].sum(1).tolist() == lengths.tolist()
    assert batch["input_ids"].shape == batch["targets"].shape == batch["mask"].shape == (8, int(lengths.max()))
    vocab = dm.vocab
    assert (batch["input_ids"][:, 0] == vocab.bos_id).all()
    ends = batch["targets"][torch.arange(8), lengths - 1]
    assert (ends == vocab.eos_id).all()
    assert (batch["targets"][~batch["mask"]] == vocab.pad_id).all()


def test_token_text_is_real_stdlib_text():
    dm = TokenSequenceDataModule(max_chars=1000, num_val_samples=10)
    dm.setup()
    lines = stdlib_docstring_lines()
    decoded = {"".join(dm.vocab.itos[i] for i in s["tokens"][1:-1].tolist()) for s in dm.train_set}
    assert decoded <= set(lines) and len(decoded) >= 400


@pytest.mark.parametrize("dm", [RegressionDataModule(), DigitsDataModule(), TokenSequenceDataModule()])
def test_padding_index_gives_an_invalid_placeholder_of_the_same_structure(dm):
    dm.setup()
    real, pad = dm.train_set[0], dm.train_set[-1]
    assert real["valid"].item() is True and pad["valid"].item() is False
    assert real.keys() == pad.keys()
    for key in real:
        assert pad[key].dtype == real[key].dtype
        if key != "tokens":
            assert pad[key].shape == real[key].shape


def test_global_sampler_covers_each_sample_once_with_padding_flagged():
    dm = RegressionDataModule(num_samples=23, num_val_samples=5, micro_batch_size=4, sampler="global")
    dm.accumulate_grad_batches = 2
    dm.setup()
    seen = []
    for batch in dm.train_dataloader():
        seen.append(batch["x"][batch["valid"]])
    x = torch.cat(seen)
    assert len(x) == 23
    assert sorted(map(tuple, x.tolist())) == sorted(map(tuple, dm.train_set.x.tolist()))


def test_global_sampler_pads_a_short_rank_with_a_micro_batch_the_loader_marks():
    # 5 samples, 2 ranks, micro-batch 2: the last step holds 1 sample, so rank 1 gets a padding micro-batch. The
    # loader fetches a real sample for it (the dataset never sees -1) and marks it; the rescaler counts it as 0.
    dm = RegressionDataModule(num_samples=5, num_val_samples=2, micro_batch_size=2, sampler="global")
    dm.setup()
    xs, padding = [], []
    for rank in (0, 1):
        dm.trainer = type("T", (), {"world_size": 2, "global_rank": rank, "current_epoch": 0})()
        loader = dm.train_dataloader()
        batches = list(loader)
        padding += [loader.is_padding(p) for p in range(len(batches))]
        xs += [b["x"] for p, b in enumerate(batches) if not loader.is_padding(p)]
        assert all(b["valid"].all() for b in batches)
    assert padding == [False, False, False, True]
    x = torch.cat(xs)
    assert sorted(map(tuple, x.tolist())) == sorted(map(tuple, dm.train_set.x.tolist()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"sampler": "distributed"}, "sampler must be"), ({"micro_batch_size": 0}, "micro_batch_size must be")],
)
def test_bad_loader_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)
