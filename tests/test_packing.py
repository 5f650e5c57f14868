"""Packed rows train like padded rows: ``PackCollate`` + ``AttentionLM`` (document-isolated attention, positions
reset per document) follow the trajectory of the same micro-batches padded one document per row (``PadCollate``),
under the token mean and under the per-document mean (``segments``), with K=2 and a shorter last window."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from cases import EXACT_TOLERANCE
from reference import flat_parameters, relative_distance
from torch.utils.data import DataLoader

from lightning_accum import SampleCountRescaler
from lightning_accum.demos import AttentionLM, PackCollate
from lightning_accum.demos.collate import PadCollate

VOCAB, ROW = 13, 12


def micro_batches() -> list[list[dict[str, torch.Tensor]]]:
    """7 micro-batches of 2 to 6 documents of 2 to 9 tokens (some placeholders)."""
    gen = torch.Generator().manual_seed(3)
    batches = []
    for size in [5, 2, 6, 3, 4, 2, 5]:
        lengths = torch.randint(2, 10, (size,), generator=gen).tolist()
        batches.append([{"tokens": torch.randint(1, VOCAB, (n,), generator=gen), "valid": torch.tensor(True)}
                        for n in lengths])  # fmt: skip
    batches[3][1] = {"tokens": torch.zeros(2, dtype=torch.long), "valid": torch.tensor(False)}
    return batches


class Fitted(AttentionLM):
    def __init__(self, batches, **kwargs) -> None:
        super().__init__(**kwargs)
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)


def fit(collate, document_mean: bool, mode: str = "deferred") -> torch.Tensor:
    torch.manual_seed(0)
    # SGD: Adam would turn the rounding noise of gradients that are 0 in exact arithmetic into full steps.
    optimizer = lambda params: torch.optim.SGD(params, lr=0.5)  # noqa: E731
    module = Fitted([collate(mb) for mb in micro_batches()], vocab_size=VOCAB, dim=8, heads=2, max_length=16,
                    document_mean=document_mean, optimizer=optimizer)  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, accumulate_grad_batches=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[SampleCountRescaler(mode=mode)])  # fmt: skip
    trainer.fit(module)
    return flat_parameters(module)


@pytest.fixture(scope="module")
def initial() -> torch.Tensor:
    torch.manual_seed(0)
    return flat_parameters(AttentionLM(vocab_size=VOCAB, dim=8, heads=2, max_length=16))


@pytest.fixture(scope="module")
def padded() -> dict[bool, torch.Tensor]:
    return {document_mean: fit(PadCollate(0), document_mean) for document_mean in (False, True)}


@pytest.mark.parametrize("mode", ["deferred", "lookahead"])
@pytest.mark.parametrize("document_mean", [False, True], ids=["token_mean", "document_mean"])
def test_packed_equals_padded(document_mean: bool, mode: str, padded, initial, measured) -> None:
    packed = fit(PackCollate(0, ROW), document_mean, mode)
    assert measured(relative_distance(packed, padded[document_mean], initial)) <= EXACT_TOLERANCE


def test_the_two_normalisations_differ(padded, initial) -> None:
    assert relative_distance(padded[True], padded[False], initial) > 0.05


def test_packing_fills_rows_and_refuses_long_documents() -> None:
    batch = PackCollate(0, ROW)(micro_batches()[0])
    assert batch["mask"].sum() == sum(len(d["tokens"]) - 1 for d in micro_batches()[0])
    assert len(batch["mask"]) < len(micro_batches()[0])  # fewer rows than documents
    with pytest.raises(ValueError, match="does not fit a row of 3"):
        PackCollate(0, 3)(micro_batches()[0])
