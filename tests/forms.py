"""The loss forms of ``sample_loss`` / ``batch_loss`` (per-item weights, per-batch terms, per-document means) as
test cases: micro-batches per rank, module-level LightningModules (picklable for spawned ranks), and an
independent plain-PyTorch reference.

The reference (``forms_reference``) imports nothing of lightning_accum: each window's loss is
``sum(w * loss) / sum(w)`` over its items on every rank, plus ``coef * mean of the term over the window's
micro-batches``, computed from the micro-batches directly (per-document means by a loop over documents).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch
from cases import CLASSES, FEATURES, make_optimizer
from fits import PlannedModule
from reference import flat_parameters, split_into_windows
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_accum import SampleCountMixin

# A micro-batch: (x (n, T, F), y (n, T), mask (n, T) bool, extra (n, T)): extra is the weight or the segments.
FormBatch = tuple[Tensor, Tensor, Tensor, Tensor]

TERM_COEFFICIENTS = (0.05, 0.02)  # the two batch_loss terms of "terms" (and a second call of the first)


def token_losses(net: nn.Module, batch: FormBatch) -> Tensor:
    x, y, _, _ = batch
    logits = net(x)
    return nn.functional.cross_entropy(logits.reshape(-1, CLASSES), y.reshape(-1), reduction="none").view(y.shape)


def terms(net: nn.Module, batch: FormBatch) -> tuple[Tensor, Tensor]:
    """Two per-micro-batch terms (0-dim): a logit penalty and an L2 penalty of the first layer."""
    logits = net(batch[0])
    return logits.square().mean(), net[0].weight.square().sum()


def weighted_batch(size: int, seed: int, tokens: int = 3, zero_weights: bool = False) -> FormBatch:
    """``size`` sequences of ``tokens`` tokens; a mask keeps ~70%, weights in [0, 2) with ~20% zeros."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, tokens, FEATURES, generator=gen)
    y = torch.randint(0, CLASSES, (size, tokens), generator=gen)
    mask = torch.rand(size, tokens, generator=gen) < 0.7
    weight = 2 * torch.rand(size, tokens, generator=gen) * (torch.rand(size, tokens, generator=gen) > 0.2)
    return x, y, mask, torch.zeros_like(weight) if zero_weights else weight


def packed_batch(size: int, seed: int, tokens: int = 8) -> FormBatch:
    """``size`` rows of ``tokens`` tokens, each packing 1 to 4 documents (ids need not be ordered); padding
    (mask False) at the end of some rows."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, tokens, FEATURES, generator=gen)
    y = torch.randint(0, CLASSES, (size, tokens), generator=gen)
    segments = torch.zeros(size, tokens, dtype=torch.long)
    mask = torch.ones(size, tokens, dtype=torch.bool)
    for row in range(size):
        cuts = sorted(torch.randperm(tokens - 1, generator=gen)[: int(torch.randint(0, 4, (), generator=gen))] + 1)
        ids = torch.randperm(tokens, generator=gen)[: len(cuts) + 1]
        for start, end, doc in zip([0, *cuts], [*cuts, tokens], ids, strict=True):
            segments[row, start:end] = doc
        mask[row, tokens - int(torch.randint(0, 3, (), generator=gen)) :] = False
    return x, y, mask, segments


def document_means(net: nn.Module, batch: FormBatch) -> tuple[Tensor, Tensor]:
    """The reference's per-document items: each (row, document) with counted tokens, its mean token loss."""
    losses = token_losses(net, batch)
    _, _, mask, segments = batch
    means = []
    for row in range(len(losses)):
        for doc in segments[row].unique().tolist():
            tokens = (segments[row] == doc) & mask[row]
            if tokens.any():
                means.append(losses[row][tokens].mean())
    return torch.stack(means), torch.ones(len(means))


def weighted_items(net: nn.Module, batch: FormBatch) -> tuple[Tensor, Tensor]:
    return token_losses(net, batch), batch[2].float() * batch[3]


def masked_items(net: nn.Module, batch: FormBatch) -> tuple[Tensor, Tensor]:
    return token_losses(net, batch), batch[2].float()


ITEMS: dict[str, Callable[[nn.Module, FormBatch], tuple[Tensor, Tensor]]] = {
    "weights": weighted_items,
    "terms": masked_items,
    "segments": document_means,
}


@dataclass
class FormCase:
    """Micro-batches per rank of one loss form, their accumulation K, epochs and optimizer."""

    form: str
    plan: list[list[FormBatch]]
    k: int
    epochs: int = 2
    optimizer: str = "adamw"
    lr: float = 0.05

    def windows(self) -> list[list[list[FormBatch]]]:
        """Per window, the micro-batches of each rank."""
        per_rank = [split_into_windows(rank_plan, self.k) for rank_plan in self.plan]
        return [[windows[i] for windows in per_rank] for i in range(len(per_rank[0]))] * self.epochs


@dataclass
class FormReference:
    parameters: Tensor
    step_losses: list[float] = field(default_factory=list)  # each window's weighted item mean (nan: no step)


def forms_reference(net: nn.Module, case: FormCase) -> FormReference:
    """Plain PyTorch: per window ``sum(w * l) / sum(w)`` over all ranks' items, plus for "terms" each term's mean
    over the window's micro-batches times its coefficient; a window whose weights sum to 0 makes no step."""
    net = copy.deepcopy(net)
    optimizer = make_optimizer(case.optimizer, case.lr)(net)
    run = FormReference(torch.empty(0))
    for window in case.windows():
        micro_batches = [mb for rank in window for mb in rank]
        pairs = [ITEMS[case.form](net, mb) for mb in micro_batches]
        weighted = sum((values * weights).sum() for values, weights in pairs)
        total = sum(float(weights.sum()) for _, weights in pairs)
        if total == 0:
            run.step_losses.append(float("nan"))
            continue
        loss = weighted / total
        run.step_losses.append(float(loss.detach()))
        if case.form == "terms":
            term_sums = [sum(parts) for parts in zip(*(terms(net, mb) for mb in micro_batches), strict=True)]
            first, second = TERM_COEFFICIENTS
            loss = loss + (2 * first * term_sums[0] + second * term_sums[1]) / len(micro_batches)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    run.parameters = flat_parameters(net)
    return run


class FormModule(SampleCountMixin, PlannedModule):
    """Trains ``net`` on ``case.plan[global_rank]`` with the case's loss form."""

    def form_loss(self, batch: FormBatch) -> Tensor:
        losses, (_, _, mask, extra) = token_losses(self.net, batch), batch
        if self.case.form == "weights":
            return self.sample_loss(losses, mask, weight=extra)
        if self.case.form == "segments":
            return self.sample_loss(losses, mask, segments=extra)
        first, second = terms(self.net, batch)
        a, b = TERM_COEFFICIENTS
        # Two batch_loss calls of the same term and a second term: each is its mean over the window's micro-batches.
        return (
            self.sample_loss(losses, mask)
            + a * self.batch_loss(first)
            + a * self.batch_loss(first)
            + b * (self.batch_loss(second))
        )

    def training_step(self, batch: FormBatch, batch_idx: int) -> Tensor:
        return self.form_loss(batch)

    def count_items(self, batch: FormBatch) -> Tensor:
        """Look-ahead's count: the counted weights' sum (float32), or the counted documents."""
        _, _, mask, extra = batch
        if self.case.form == "weights":
            return (mask * extra).sum()
        if self.case.form == "segments":
            return torch.tensor(sum(len(row[kept].unique()) for row, kept in zip(extra, mask, strict=True)))
        return mask.sum()


class ManualFormModule(FormModule):
    """Manual optimization: ``sample_backward`` per micro-batch, a step after every K and at the epoch's end."""

    def __init__(self, net: nn.Module, case: FormCase) -> None:
        super().__init__(net, case)
        self.automatic_optimization = False

    def training_step(self, batch: FormBatch, batch_idx: int) -> None:
        _, _, mask, extra = batch
        kind = {"weights": "weight", "segments": "segments"}[self.case.form]
        self.sample_backward(token_losses(self.net, batch), mask, **{kind: extra})
        if (batch_idx + 1) % self.case.k == 0 or self.trainer.is_last_batch:
            optimizer = self.optimizers()
            optimizer.step()
            optimizer.zero_grad()


def plan_of(make: Callable[..., FormBatch], sizes: Sequence[Sequence[int]], **kwargs) -> list[list[FormBatch]]:
    return [[make(n, seed=100 * r + i, **kwargs) for i, n in enumerate(rank)] for r, rank in enumerate(sizes)]


def weights_case() -> FormCase:
    """One rank, K=3, windows [4, 2, 5] [3, 1, 3] [2]: the second window's weights all 0 (no step)."""
    plan = plan_of(weighted_batch, [[4, 2, 5, 3, 1, 3, 2]])
    plan[0][3:6] = [weighted_batch(n, seed=50 + i, zero_weights=True) for i, n in enumerate([3, 1, 3])]
    return FormCase("weights", plan, k=3)


def weights_ranks_case() -> FormCase:
    """Two ranks of 5 micro-batches of different sizes, K=2: a partial last window."""
    return FormCase("weights", plan_of(weighted_batch, [[4, 1, 3, 5, 2], [1, 6, 2, 2, 3]]), k=2)


def terms_case() -> FormCase:
    """One rank, K=3, 7 micro-batches: windows of 3, 3 and 1 micro-batches."""
    return FormCase("terms", plan_of(weighted_batch, [[4, 2, 5, 3, 1, 3, 2]]), k=3)


def terms_ranks_case() -> FormCase:
    return FormCase("terms", plan_of(weighted_batch, [[4, 1, 3, 5, 2], [1, 6, 2, 2, 3]]), k=2)


def segments_case() -> FormCase:
    return FormCase("segments", plan_of(packed_batch, [[3, 1, 4, 2, 2, 1, 3]]), k=3)


def segments_ranks_case() -> FormCase:
    return FormCase("segments", plan_of(packed_batch, [[3, 1, 4, 2, 2], [1, 2, 1, 3, 2]]), k=2)


def fit_form(case: FormCase, module: FormModule, callbacks: list[pl.Callback], **trainer_kwargs) -> pl.Trainer:
    """Fit ``module`` quietly on the CPU (one rank per entry of ``case.plan`` unless ``devices`` says otherwise)."""
    automatic = module.automatic_optimization
    trainer = pl.Trainer(
        accelerator=trainer_kwargs.pop("accelerator", "cpu"),
        devices=trainer_kwargs.pop("devices", len(case.plan)),
        max_epochs=case.epochs,
        accumulate_grad_batches=case.k if automatic else 1,
        callbacks=callbacks,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(module)
    return trainer


class EvalModule(FormModule):
    """``FormModule`` whose validation and test sets are ``val_plan[global_rank]`` (micro-batches of any size)."""

    def __init__(self, net: nn.Module, case: FormCase, val_plan: list[list[FormBatch]]) -> None:
        super().__init__(net, case)
        self.val_plan = val_plan

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_plan[self.trainer.global_rank], batch_size=None)

    test_dataloader = val_dataloader

    def validation_step(self, batch: FormBatch, batch_idx: int) -> Tensor:
        losses = token_losses(self.net, batch)
        self.log("val/batch_mean", self.sample_loss(losses, batch[2]), on_epoch=True, batch_size=len(losses))
        return self.sample_loss(losses, batch[2])

    test_step = validation_step


class GlobalLoaderEvalModule(EvalModule):
    """``EvalModule`` whose validation and test sets are one batch's sequences dealt by a ``GlobalBatchLoader``
    over ``replicas`` ranks (this process is rank ``rank``, else the trainer's): a rank that runs short gets a
    padding micro-batch, which the loader fills with a real sequence."""

    def __init__(self, net: nn.Module, case: FormCase, sequences: FormBatch, replicas: int, rank: int | None = None):
        super().__init__(net, case, [])
        self.sequences, self.replicas, self.rank = sequences, replicas, rank

    def val_dataloader(self) -> DataLoader:
        from lightning_accum import GlobalBatchLoader, GlobalBatchSampler

        rank = self.trainer.global_rank if self.rank is None else self.rank
        items = list(zip(*self.sequences, strict=True))
        sampler = GlobalBatchSampler(len(items), 2, num_replicas=self.replicas, rank=rank, shuffle=False)
        return GlobalBatchLoader(items, sampler)

    test_dataloader = val_dataloader


def eval_reference(net: nn.Module, val_plan: list[list[FormBatch]]) -> float:
    """The token-weighted mean of the masked token losses over every rank's validation micro-batches."""
    with torch.no_grad():
        pairs = [masked_items(net, mb) for rank in val_plan for mb in rank]
    return float(sum((losses * mask).sum() for losses, mask in pairs) / sum(mask.sum() for _, mask in pairs))
