"""Length-grouped micro-batches (``GlobalBatchSampler(lengths=, max_tokens=)``): less padding, same trajectory.

Grouping only re-cuts each optimizer step's window, so exact runs with and without it must end at the parameters
of one plain-PyTorch reference: step ``s`` of epoch ``e`` takes the mean token loss over window ``s`` of
``randperm(SEED + e)`` (windows of ``E = 8`` samples). Padded fractions, budgets and the fewest-padding claim are
checked from the lengths alone, by brute force where it is small enough.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from cases import expected_steps, step_sets
from fits import QUIET_TRAINER, ranks_strategy
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import MicroBatch, flat_parameters, relative_distance, train_reference
from torch import Tensor

from lightning_accum import GlobalBatchLoader, GlobalBatchSampler, SampleCountRescaler
from lightning_accum.data.sampler import grouped_micro_batches
from lightning_accum.demos import CausalLM
from lightning_accum.demos.collate import PadCollate
from lightning_accum.demos.datasets import TokenSequenceDataset

SAMPLES, VOCAB, EFFECTIVE, EPOCHS, SEED, LR = 25, 10, 8, 3, 3, 0.5  # 3 full windows of 8 + 1 sample per epoch
MAX_TOKENS = 50  # the smallest budget every window of these 25 lengths fits (2 x the longest would be 80)
GROUPINGS = {"none": {}, "samples": {"grouped": True}, "tokens": {"grouped": True, "max_tokens": MAX_TOKENS}}
SPLITS = {1: (4, 2), 2: (2, 2)}  # ranks -> (accumulation K, micro-batch size): E = 8


def lognormal_lengths(n: int, seed: int, median: float = 8.0, longest: int = 40) -> list[int]:
    """Many short, few long: ``exp(N(log median, 0.8))`` rounded into ``[2, longest]``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(n, generator=gen) * 0.8 + math.log(median)).round().clamp(2, longest).long().tolist()


def token_data() -> TokenSequenceDataset:
    """Random-token sequences whose next-token targets number ``lognormal_lengths(SAMPLES, 0)``."""
    gen = torch.Generator().manual_seed(1)
    sequences = [torch.randint(1, VOCAB, (length + 1,), generator=gen) for length in lognormal_lengths(SAMPLES, 0)]
    return TokenSequenceDataset(sequences, pad_id=0)


def make_lm() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(
        VOCAB, embed_dim=8, hidden_size=12, optimizer=functools.partial(torch.optim.SGD, lr=LR, momentum=0.9)
    )


class GroupedLM(CausalLM):
    """The demo LM on ``token_data()`` through a ``GlobalBatchLoader``; records the padding it trains on."""

    def __init__(self, ranks: int, grouped: bool = False, max_tokens: int | None = None) -> None:
        reference = make_lm()
        super().__init__(VOCAB, embed_dim=8, hidden_size=12, optimizer=reference.optimizer_factory)
        self.load_state_dict(reference.state_dict())
        self.ranks, self.grouped, self.max_tokens = ranks, grouped, max_tokens
        self.slots = self.real = 0  # padded slots and real target tokens of the micro-batches trained on

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self.slots += batch["mask"][batch["valid"]].numel()
        self.real += int(self.loss_mask(batch).sum())
        return super().training_step(batch, batch_idx)

    def train_dataloader(self) -> GlobalBatchLoader:
        data = token_data()
        k, b = SPLITS[self.ranks]
        lengths = data.lengths() if self.grouped else None
        sampler = GlobalBatchSampler(len(data), b, k, seed=SEED, lengths=lengths, max_tokens=self.max_tokens)
        return GlobalBatchLoader(data, sampler, collate_fn=PadCollate(0))


class StopAt(pl.Callback):
    """Save a checkpoint to ``path`` and stop at global step ``step``."""

    def __init__(self, path: Path, step: int) -> None:
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def fit(module: GroupedLM, callbacks: list[pl.Callback] = (), ckpt_path: Path | None = None) -> Tensor:
    strategy, release = ranks_strategy(module.ranks)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=module.ranks,
        strategy=strategy,
        max_epochs=EPOCHS,
        accumulate_grad_batches=SPLITS[module.ranks][0],
        use_distributed_sampler=False,
        callbacks=[SampleCountRescaler(), *callbacks, *release],
        **QUIET_TRAINER,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return flat_parameters(module)


@pytest.fixture(scope="module")
def reference() -> tuple[Tensor, Tensor]:
    """Initial and final parameters of plain PyTorch: each window of the permutation as one padded batch."""
    data, collate = token_data(), PadCollate(0)
    windows: list[list[MicroBatch]] = []
    for epoch in range(EPOCHS):
        order = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
        for start in range(0, SAMPLES, EFFECTIVE):
            batch = collate([data[i] for i in order[start : start + EFFECTIVE]])
            windows.append([(batch["input_ids"], batch["targets"], batch["mask"])])
    lm = make_lm()
    run = train_reference(lm, windows, lambda model: torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9))
    return flat_parameters(lm), run.parameters


@pytest.fixture(scope="module")
def single_process() -> dict[str, tuple[Tensor, float]]:
    """Final parameters and trained padded fraction of one-process runs (K=4, B=2) for every grouping."""
    runs = {}
    for name, kwargs in GROUPINGS.items():
        module = GroupedLM(ranks=1, **kwargs)
        runs[name] = fit(module), 1 - module.real / module.slots
    return runs


# ---------------------------------------------------------------------------------------------- (a) trajectory


@pytest.mark.parametrize("grouping", ["samples", "tokens"])
def test_grouped_run_keeps_the_trajectory_in_one_process(single_process, reference, measured, grouping) -> None:
    initial, final = reference
    grouped, grouped_padding = single_process[grouping]
    ungrouped, ungrouped_padding = single_process["none"]
    assert measured(relative_distance(grouped, final, initial), "to reference") < 1e-5
    assert measured(relative_distance(grouped, ungrouped, initial), "to ungrouped") < 1e-5
    assert measured(relative_distance(ungrouped, final, initial), "ungrouped to reference") < 1e-5
    assert grouped_padding < 0.5 * ungrouped_padding  # the micro-batches really were different


@pytest.mark.slow
@pytest.mark.two_ranks("grouping-samples", "grouping-tokens")
@pytest.mark.parametrize("grouping", ["samples", "tokens"])
def test_grouped_run_keeps_the_trajectory_on_two_ranks(reference, measured, two_rank_runs, grouping) -> None:
    initial, final = reference
    parameters = two_rank_runs[f"grouping-{grouping}"]["parameters"]  # fit(GroupedLM(ranks=2, **GROUPINGS[grouping]))
    assert measured(relative_distance(parameters, final, initial)) < 1e-5


# ---------------------------------------------------------------------------------------------- (b) padding


def padded_fraction(batches: list[list[int]], lengths: list[int]) -> float:
    """Padded slots over all slots, each micro-batch padded to its longest sample (padding slots excluded)."""
    real = [[lengths[i] for i in batch if i != -1] for batch in batches]
    slots = sum(max(b, default=0) * len(b) for b in real)
    return 1 - sum(map(sum, real)) / slots


def epoch_batches(lengths: list[int], ranks: int, k: int, b: int, **kwargs) -> list[list[list[int]]]:
    return [
        list(GlobalBatchSampler(len(lengths), b, k, ranks, rank, seed=SEED, lengths=lengths, **kwargs))
        for rank in range(ranks)
    ]


def test_padded_fraction_drops(measured) -> None:
    # 600 log-normal lengths (median 30, up to 400), 2 ranks x K=4 x B=8: 8 micro-batches per window of 64.
    lengths = lognormal_lengths(600, seed=2, median=30, longest=400)
    plain = [list(GlobalBatchSampler(600, 8, 4, 2, rank, seed=SEED)) for rank in range(2)]
    before = padded_fraction([b for rank in plain for b in rank], lengths)
    by_samples = padded_fraction([b for r in epoch_batches(lengths, 2, 4, 8) for b in r], lengths)
    by_tokens = padded_fraction([b for r in epoch_batches(lengths, 2, 4, 8, max_tokens=1600) for b in r], lengths)
    assert measured(before, "ungrouped") > 0.5
    assert measured(by_samples, "grouped, 8 samples each") < 0.5 * before
    assert measured(by_tokens, "grouped, 1600 tokens each") < 0.25 * before


def fewest_padded_tokens(lengths: list[int], groups: int, max_samples: int | None, max_tokens: int | None) -> int:
    """Brute force: the least total ``longest * samples`` over every assignment of samples to groups."""
    best = math.inf
    for assignment in itertools.product(range(groups), repeat=len(lengths)):
        members = [[lengths[i] for i, g in enumerate(assignment) if g == group] for group in range(groups)]
        padded = [max(m, default=0) * len(m) for m in members]
        if all(len(m) <= (max_samples or len(lengths)) for m in members) and max(padded) <= (max_tokens or math.inf):
            best = min(best, sum(padded))
    return best


@pytest.mark.parametrize("max_tokens", [None, 24])
def test_grouping_has_the_fewest_padded_tokens(max_tokens: int | None) -> None:
    rng = random.Random(4)
    for _ in range(12):
        lengths = [rng.randint(1, 12) for _ in range(6)]
        batches = grouped_micro_batches(list(range(6)), lengths, 1, 0, micro_batch_size=2, max_tokens=max_tokens)
        assert len(batches) == 3
        padded = sum(max(lengths[i] for i in b) * len(b) for b in batches if b != [-1])
        assert padded == fewest_padded_tokens(lengths, 3, None if max_tokens else 2, max_tokens), lengths


# ---------------------------------------------------------------------------------------------- (c) layout


def accepts(n: int, b: int, k: int, r: int, lengths: list[int], max_tokens: int) -> bool:
    try:
        GlobalBatchSampler(n, b, k, r, 0, lengths=lengths, max_tokens=max_tokens)
    except ValueError:
        return False
    return True


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 70),
    r=st.integers(1, 3),
    k=st.integers(1, 3),
    b=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    budget=st.booleans(),
)
def test_every_sample_once_same_steps_and_budget_held(n: int, r: int, k: int, b: int, seed: int, budget: bool) -> None:
    lengths = [random.Random(seed + i).randint(1, 20) for i in range(n)]
    e = r * k * b
    max_tokens = None
    if budget:  # the tightest budget the sampler accepts; b longest samples always fit (next() fails otherwise)
        max_tokens = next(t for t in range(max(lengths), b * max(lengths) + 1) if accepts(n, b, k, r, lengths, t))
    per_rank = []
    for rank in range(r):
        sampler = GlobalBatchSampler(n, b, k, r, rank, seed=seed, lengths=lengths, max_tokens=max_tokens)
        sampler.set_epoch(1)
        per_rank.append(list(sampler))
        assert len(per_rank[-1]) == len(sampler)
    counts = {len(batches) for batches in per_rank}
    assert counts == {k * (n // e) + math.ceil(n % e / (r * b))}  # K per full window on every rank
    batches = [batch for rank_batches in per_rank for batch in rank_batches]
    assert all(batch == [-1] or -1 not in batch for batch in batches)
    real = [batch for batch in batches if batch != [-1]]
    if max_tokens is None:
        assert all(len(batch) <= b for batch in real)
    else:
        assert all(max(lengths[i] for i in batch) * len(batch) <= max_tokens for batch in real)
    assert step_sets(per_rank, k) == expected_steps(n, e, seed, epoch=1)  # each step: its window, whatever the split


def test_lengths_as_a_callable_group_as_the_sequence() -> None:
    lengths = lognormal_lengths(40, seed=6)
    as_list = GlobalBatchSampler(40, 4, 2, 2, 1, seed=SEED, lengths=lengths, max_tokens=160)
    as_callable = GlobalBatchSampler(40, 4, 2, 2, 1, seed=SEED, lengths=lengths.__getitem__, max_tokens=160)
    assert list(as_callable) == list(as_list) != list(GlobalBatchSampler(40, 4, 2, 2, 1, seed=SEED))


# ---------------------------------------------------------------------------------------------- (d) resume


def test_loader_resumes_mid_epoch_like_an_uninterrupted_run() -> None:
    lengths = lognormal_lengths(50, seed=5)

    def loader() -> GlobalBatchLoader:
        sampler = GlobalBatchSampler(50, 2, 3, seed=SEED, lengths=lengths, max_tokens=90)
        sampler.set_epoch(1)
        return GlobalBatchLoader(list(range(50)), sampler, collate_fn=list)

    whole = list(loader())
    interrupted = loader()
    batches = iter(interrupted)
    seen = [next(batches) for _ in range(5)]  # mid-window: 5 = one step of K=3 and 2 micro-batches
    resumed = loader()
    resumed.load_state_dict(interrupted.state_dict())
    assert seen + list(resumed) == whole
    assert whole != list(GlobalBatchLoader(list(range(50)), GlobalBatchSampler(50, 2, 3, seed=SEED), collate_fn=list))


@pytest.mark.slow
@pytest.mark.parametrize("grouping", ["samples", "tokens"])
def test_lightning_resumes_a_grouped_run_mid_epoch(tmp_path, reference, measured, grouping) -> None:
    checkpoint = tmp_path / "grouped.ckpt"
    fit(GroupedLM(ranks=1, **GROUPINGS[grouping]), [StopAt(checkpoint, step=6)])  # epoch 1, after its 2nd step
    parameters = fit(GroupedLM(ranks=1, **GROUPINGS[grouping]), ckpt_path=checkpoint)
    initial, final = reference
    assert measured(relative_distance(parameters, final, initial)) < 1e-5


@pytest.mark.parametrize(
    ("saved", "resumed", "match"),
    [
        (
            {"max_tokens": 60},
            {},
            r"saved sampler cut its windows with grouping=\{'lengths_crc32': \d+, 'max_tokens': 60\}",
        ),
        ({}, {"lengths": None}, r"grouping=\{.*\}, this one with None.*Build the GlobalBatchSampler with the saved"),
        ({}, {"lengths": [1] * SAMPLES}, r"this one with \{'lengths_crc32'"),
    ],
)
def test_resume_refuses_other_grouping_settings(saved: dict, resumed: dict, match: str) -> None:
    lengths = token_data().lengths()
    layout = GlobalBatchSampler(SAMPLES, 2, 4, seed=SEED, lengths=lengths, **saved).layout()
    with pytest.raises(ValueError, match=match):
        GlobalBatchSampler(SAMPLES, 2, 4, seed=SEED, **{"lengths": lengths, **resumed}).resume(0, 4, layout)


# ---------------------------------------------------------------------------------------------- (e) arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lengths": [3, 4]}, r"one length per sample: got 2 for dataset_size=4"),
        ({"lengths": [3, 0, 2, 2]}, r"positive ints, got 0 for sample 1"),
        ({"lengths": [3, 2.5, 2, 2]}, r"positive ints, got 2.5 for sample 1"),
        ({"lengths": [3, True, 2, 2]}, r"positive ints, got True for sample 1"),
        ({"lengths": lambda i: -i}, r"positive ints, got 0 for sample 0"),
        ({"max_tokens": 10}, r"max_tokens=10 needs `lengths`"),
        ({"lengths": [3, 4, 2, 2], "max_tokens": 0}, r"`max_tokens` must be a positive int, got 0"),
        (
            {"lengths": [3, 9, 2, 2], "max_tokens": 8},
            r"sample 1 has 9 tokens, more than max_tokens=8\. .*max_tokens>=9",
        ),
        ({"lengths": [8, 9, 7, 2], "max_tokens": 9}, r"the 4 longest samples does not fit its 2 .* max_tokens>=18"),
        # 11 samples, 1 rank x K=4 x B=2: the full windows fit [10], [10], [10], [1 x 5]; the last 3 need [10, 10]
        (
            {
                "dataset_size": 11,
                "accumulate_grad_batches": 4,
                "num_replicas": 1,
                "lengths": [10] * 3 + [1] * 8,
                "max_tokens": 10,
            },
            r"the 3 longest samples does not fit its 2 micro-batches of max_tokens=10 .* max_tokens>=20",
        ),
    ],
)
def test_argument_errors(kwargs: dict, match: str) -> None:
    args = {"dataset_size": 4, "micro_batch_size": 2, "accumulate_grad_batches": 1, "num_replicas": 2, "rank": 0}
    with pytest.raises(ValueError, match=match):
        GlobalBatchSampler(**{**args, **kwargs})
