"""Example LightningModules whose ``training_step`` returns ``sample_loss`` with the padding mask."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_accum import SampleCountMixin

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def _default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


class MLPModel(SampleCountMixin, pl.LightningModule):
    """A ReLU multilayer perceptron for classification (cross-entropy) or regression (squared error).

    Each sample is one item; padding samples (``batch["valid"]`` false) count for nothing.

    Args:
        in_features: input width.
        out_features: classes, or 1 for regression.
        task: ``"classification"`` or ``"regression"``.
        hidden_sizes: widths of the hidden layers.
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_: true`` optimizer); AdamW(1e-3) if ``None``.

    Examples:
        >>> model = MLPModel(in_features=4, out_features=3, hidden_sizes=[8])
        >>> model(torch.zeros(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        task: Literal["classification", "regression"] = "classification",
        hidden_sizes: Sequence[int] = (64,),
        optimizer: OptimizerFactory | None = None,
    ) -> None:
        super().__init__()
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {task!r}.")
        # A plain list (not Hydra's ListConfig) in the hyper-parameters, so that torch.load(weights_only=True)
        # reads the checkpoints, as Trainer.fit(ckpt_path=...) does.
        hidden_sizes = [int(width) for width in hidden_sizes]
        self.save_hyperparameters(ignore=["optimizer"])
        widths = [in_features, *hidden_sizes]
        layers: list[nn.Module] = []
        for width_in, width_out in pairwise(widths):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(widths[-1], out_features))
        self.task = task
        self.optimizer_factory = optimizer or _default_optimizer
        self.val_loss = MeanMetric()
        self.val_acc = MeanMetric()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def item_losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Per-sample losses and the network output."""
        out = self(batch["x"])
        if self.task == "classification":
            return F.cross_entropy(out, batch["y"], reduction="none"), out
        return F.mse_loss(out.squeeze(-1), batch["y"], reduction="none"), out

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        losses, _ = self.item_losses(batch)
        return self.sample_loss(losses, mask=batch["valid"])

    def count_items(self, batch: dict[str, Tensor]) -> Tensor:
        """The samples ``training_step`` counts: the valid ones (for ``SampleCountRescaler(mode="lookahead")``).

        Examples:
            >>> MLPModel(in_features=2, out_features=3).count_items({"valid": torch.tensor([True, False, True])})
            tensor(2)
        """
        return batch["valid"].sum()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        losses, out = self.item_losses(batch)
        weight = batch["valid"].float()
        self.val_loss.update(losses, weight)
        self.log("val/loss", self.val_loss, prog_bar=True)
        if self.task == "classification":
            self.val_acc.update((out.argmax(-1) == batch["y"]).float(), weight)
            self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())


class CausalLM(SampleCountMixin, pl.LightningModule):
    """A small GRU next-token language model; every valid target token is one item.

    The loss mask is ``batch["mask"] & batch["valid"][:, None]``: padding tokens and padding samples
    count for nothing.

    Args:
        vocab_size: number of token ids.
        pad_id: id of the padding token.
        embed_dim: token embedding width.
        hidden_size: GRU state width.
        num_layers: stacked GRU layers.
        optimizer: ``params -> Optimizer``; AdamW(1e-3) if ``None``.

    Examples:
        >>> lm = CausalLM(vocab_size=11, pad_id=0, embed_dim=4, hidden_size=8)
        >>> lm(torch.zeros(2, 5, dtype=torch.long)).shape
        torch.Size([2, 5, 11])
    """

    def __init__(
        self,
        vocab_size: int,
        pad_id: int = 0,
        embed_dim: int = 32,
        hidden_size: int = 64,
        num_layers: int = 1,
        optimizer: OptimizerFactory | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.rnn = nn.GRU(embed_dim, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)
        self.optimizer_factory = optimizer or _default_optimizer
        self.val_loss = MeanMetric()

    def forward(self, input_ids: Tensor) -> Tensor:
        hidden, _ = self.rnn(self.embed(input_ids))
        return self.head(hidden)

    @staticmethod
    def loss_mask(batch: dict[str, Tensor]) -> Tensor:
        """The ``[B, T]`` mask of the target tokens that count: unpadded tokens of valid samples."""
        return batch["mask"] & batch["valid"][:, None]

    def token_losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Per-token losses ``[B, T]`` and the mask of the tokens that count."""
        logits = self(batch["input_ids"])
        losses = F.cross_entropy(logits.transpose(1, 2), batch["targets"], reduction="none")
        return losses, self.loss_mask(batch)

    def count_items(self, batch: dict[str, Tensor]) -> Tensor:
        """The tokens ``training_step`` counts (for ``SampleCountRescaler(mode="lookahead")``).

        Examples:
            >>> batch = {"mask": torch.tensor([[True, True], [True, False]]), "valid": torch.tensor([True, False])}
            >>> CausalLM(vocab_size=5).count_items(batch)
            tensor(2)
        """
        return self.loss_mask(batch).sum()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        losses, mask = self.token_losses(batch)
        return self.sample_loss(losses, mask=mask)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        losses, mask = self.token_losses(batch)
        self.val_loss.update(losses, mask.float())
        self.log("val/loss", self.val_loss, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())
