"""LightningDataModules of the example app: synthetic regression, scikit-learn digits, stdlib text.

Each takes ``sampler="default"`` (a shuffled ``DataLoader``; Lightning adds a ``DistributedSampler``
under DDP) or ``sampler="global"`` (a ``lightning_accum.GlobalBatchLoader`` over a ``GlobalBatchSampler``:
every optimizer step sees the same global set of samples whatever the number of ranks, and a mid-epoch
checkpoint resumes at the next unseen micro-batch; needs ``Trainer(use_distributed_sampler=False)``).
Validation then reads a plain ``DataLoader`` over a ``GlobalBatchSampler`` with K=1: its padding index reaches
the datasets, which turn it into a ``valid=False`` placeholder that the metrics exclude.
``accumulate_grad_batches`` is the run's K (an int or an epoch -> K mapping), which the global sampler needs
to form windows. Each describes its data (``num_features`` and ``num_classes``, or ``vocab``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_accum.demos.collate import PadCollate
from lightning_accum.demos.datasets import FeatureDataset, TokenSequenceDataset
from lightning_accum.demos.schedule import AccumulationK, k_at_epoch, normalize_k
from lightning_accum.demos.text import CharVocab, stdlib_docstring_lines

SamplerKind = Literal["default", "global"]


class ExampleDataModule(pl.LightningDataModule):
    """Shared loaders of the example data modules; subclasses implement ``build`` and describe their data.

    Args:
        micro_batch_size: samples per micro-batch on one rank.
        sampler: ``"default"`` or ``"global"`` (see the module docstring).
        accumulate_grad_batches: the run's K, an int or an epoch -> K mapping; ``None``: the Trainer's K when each
            epoch's loader is built (a K that a callback such as ``NoiseScaleAccumulation`` sets).
        shuffle: shuffle the training samples each epoch.
        seed: seed of the global sampler's shuffle.
        num_workers: ``DataLoader`` worker processes.
    """

    def __init__(
        self,
        micro_batch_size: int = 32,
        sampler: SamplerKind = "default",
        accumulate_grad_batches: AccumulationK | None = 1,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}.")
        if sampler not in ("default", "global"):
            raise ValueError(f"sampler must be 'default' or 'global', got {sampler!r}.")
        self.micro_batch_size = micro_batch_size
        self.sampler = sampler
        self.accumulate_grad_batches = None if accumulate_grad_batches is None else normalize_k(accumulate_grad_batches)
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def build(self) -> tuple[Dataset, Dataset]:
        """Return the ``(train, validation)`` datasets."""
        raise NotImplementedError

    def collate_fn(self) -> Callable | None:
        """The ``DataLoader`` collate function (``None``: PyTorch's default)."""
        return None

    def sampler_kwargs(self, dataset: Dataset, train: bool) -> dict[str, Any]:
        """More ``GlobalBatchSampler`` arguments for ``dataset`` (none here; length grouping in subclasses)."""
        return {}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = self.build()

    def _ranks(self) -> tuple[int, int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0, 0
        return trainer.world_size, trainer.global_rank, trainer.current_epoch

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        common = {"collate_fn": self.collate_fn(), "num_workers": self.num_workers}
        if self.sampler == "default":
            return DataLoader(dataset, batch_size=self.micro_batch_size, shuffle=train and self.shuffle, **common)
        from lightning_accum import GlobalBatchLoader, GlobalBatchSampler

        world_size, rank, epoch = self._ranks()
        batch_sampler = GlobalBatchSampler(
            len(dataset),
            self.micro_batch_size,
            accumulate_grad_batches=self._train_k(epoch) if train else 1,
            num_replicas=world_size,
            rank=rank,
            shuffle=train and self.shuffle,
            seed=self.seed,
            **self.sampler_kwargs(dataset, train),
        )
        if not train:
            # Outside training nothing reads the loader's padding marks: the datasets here turn the padding index
            # into a placeholder with valid=False, which the validation metrics exclude.
            return DataLoader(dataset, batch_sampler=batch_sampler, **common)
        return GlobalBatchLoader(dataset, batch_sampler, **common)

    def _train_k(self, epoch: int) -> int:
        if self.accumulate_grad_batches is not None:
            return k_at_epoch(self.accumulate_grad_batches, epoch)
        return 1 if self.trainer is None else self.trainer.accumulate_grad_batches

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, train=False)


class RegressionDataModule(ExampleDataModule):
    """Synthetic linear regression ``y = x @ w + noise`` with ``x ~ N(0, 1)``.

    The default sizes (997 train, 211 validation) are primes, so no usual batch size divides them.

    Examples:
        >>> dm = RegressionDataModule(num_samples=10, num_val_samples=3, num_features=4, micro_batch_size=4)
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["x"].shape, batch["y"].shape, batch["valid"].all().item()
        (torch.Size([4, 4]), torch.Size([4]), True)
        >>> dm.num_features, dm.num_classes  # a regression: no classes
        (4, None)
    """

    def __init__(
        self,
        num_samples: int = 997,
        num_val_samples: int = 211,
        num_features: int = 8,
        noise: float = 0.1,
        data_seed: int = 0,
        **loader_kwargs: Any,
    ) -> None:
        super().__init__(**loader_kwargs)
        self.num_samples = num_samples
        self.num_val_samples = num_val_samples
        self.num_features = num_features
        self.num_classes = None
        self.noise = noise
        self.data_seed = data_seed

    def build(self) -> tuple[Dataset, Dataset]:
        gen = torch.Generator().manual_seed(self.data_seed)
        total = self.num_samples + self.num_val_samples
        weight = torch.randn(self.num_features, generator=gen)
        x = torch.randn(total, self.num_features, generator=gen)
        y = x @ weight + self.noise * torch.randn(total, generator=gen)
        n = self.num_samples
        return FeatureDataset(x[:n], y[:n]), FeatureDataset(x[n:], y[n:])


class DigitsDataModule(ExampleDataModule):
    """scikit-learn's bundled 8x8 digits (1797 real images, no download), pixels scaled to [0, 1].

    Examples:
        >>> dm = DigitsDataModule(num_val_samples=297, micro_batch_size=64)
        >>> dm.setup()
        >>> len(dm.train_set), len(dm.val_set)
        (1500, 297)
    """

    def __init__(self, num_val_samples: int = 297, data_seed: int = 0, **loader_kwargs: Any) -> None:
        super().__init__(**loader_kwargs)
        self.num_val_samples = num_val_samples
        self.data_seed = data_seed
        self.num_features, self.num_classes = 64, 10

    def build(self) -> tuple[Dataset, Dataset]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.data_seed))
        val, train = order[: self.num_val_samples], order[self.num_val_samples :]
        return FeatureDataset(x[train], y[train]), FeatureDataset(x[val], y[val])


class TokenSequenceDataModule(ExampleDataModule):
    """Character-level lines of standard-library docstrings: real text, variable lengths, padded with a mask.

    Each line becomes ``<bos>`` + up to ``max_chars`` characters + ``<eos>``. Batches carry
    ``input_ids``, ``targets`` and a per-token ``mask`` (``[B, T]``) plus ``valid`` (``[B]``).

    ``group_by_length=True`` (only with ``sampler="global"``) cuts each optimizer step's window of training
    samples into micro-batches of similar lengths (``GlobalBatchSampler(lengths=...)``): less padding, the
    same trajectory under exact item weighting. ``max_tokens`` then bounds each micro-batch's padded tokens
    instead of its samples.

    Examples:
        >>> dm = TokenSequenceDataModule(micro_batch_size=8, max_chars=32)
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["input_ids"].shape == batch["mask"].shape, bool((batch["mask"].sum(1) <= 33).all())
        (True, True)
        >>> grouped = TokenSequenceDataModule(micro_batch_size=8, max_chars=32, sampler="global", group_by_length=True)
        >>> batch = next(iter(grouped.train_dataloader()))
        >>> int(batch["mask"].sum()) > 0.9 * batch["mask"].numel()  # under 10% padding
        True
    """

    def __init__(
        self,
        max_chars: int = 80,
        min_chars: int = 16,
        num_val_samples: int = 64,
        data_seed: int = 0,
        group_by_length: bool = False,
        max_tokens: int | None = None,
        **loader_kwargs: Any,
    ) -> None:
        super().__init__(**loader_kwargs)
        if group_by_length and self.sampler != "global":
            raise ValueError(
                f"group_by_length=True needs sampler='global', got {self.sampler!r}: only the global "
                "sampler regroups within fixed optimizer-step windows, which keeps the trajectory. Set "
                "data.sampler=global."
            )
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}.")
        if max_tokens is not None and not group_by_length:
            raise ValueError(
                f"max_tokens={max_tokens!r} bounds length-grouped micro-batches: set group_by_length=True."
            )
        self.group_by_length = group_by_length
        self.max_tokens = max_tokens
        self.max_chars = max_chars
        self.num_val_samples = num_val_samples
        self.data_seed = data_seed
        self.lines = stdlib_docstring_lines(min_chars=min_chars)
        self.vocab = CharVocab(self.lines)

    def build(self) -> tuple[Dataset, Dataset]:
        sequences = [self.vocab.encode(line, self.max_chars) for line in self.lines]
        order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(self.data_seed)).tolist()
        val, train = order[: self.num_val_samples], order[self.num_val_samples :]
        pad = self.vocab.pad_id
        return (
            TokenSequenceDataset([sequences[i] for i in train], pad),
            TokenSequenceDataset([sequences[i] for i in val], pad),
        )

    def collate_fn(self) -> Callable:
        return PadCollate(self.vocab.pad_id)

    def sampler_kwargs(self, dataset: Dataset, train: bool) -> dict[str, Any]:
        if not (train and self.group_by_length):
            return {}
        return {"lengths": dataset.lengths(), "max_tokens": self.max_tokens}
