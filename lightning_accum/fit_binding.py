"""``FitBinding``: the fit a rescaler serves, its guard on raw optimizer steps, and whether its hooks ran for
the batch the fit loop is on.

Lightning's Tuner (``lr_find``, ``scale_batch_size``) runs the fit loop with its own callbacks in place of the
user's, so a rescaler's hooks do not run for those batches while ``sample_loss`` still reaches it: it then has
to answer as a module without the rescaler would (``active`` is False).
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import torch
from torch.utils.hooks import RemovableHandle

from lightning_accum.lightning_internals import batch_token
from lightning_accum.step_guard import guard_raw_steps


class FitBinding:
    """Which Trainer a callback serves from train start to teardown, and the last batch its hooks started.

    While bound, a step of the fit's optimizer that the callback's hooks did not finish raises (``step_guard``).

    Examples:
        >>> binding = FitBinding()
        >>> binding.active  # no fit
        False
    """

    def __init__(self) -> None:
        self.trainer: pl.Trainer | None = None
        self._batch: int | None = None  # the fit loop's batch for which the callback's hooks ran
        self._step_guard: RemovableHandle | None = None

    def reset(self) -> None:
        """A new fit: no batch started yet."""
        self._batch = None

    def bind(self, trainer: pl.Trainer, stepped_unfinished: Callable[[], bool]) -> None:
        """Serve ``trainer``'s fit; refuse a step of its optimizer that the hooks ran for and left unfinished."""
        self.trainer = trainer
        self._step_guard = guard_raw_steps(trainer.optimizers[0], lambda: stepped_unfinished() and self.active)

    def unbind(self) -> None:
        """The fit ended: no Trainer, no guard."""
        if self._step_guard is not None:
            self._step_guard.remove()
            self._step_guard = None
        self.trainer = None

    def start_batch(self, trainer: pl.Trainer) -> bool:
        """Note that the callback's hooks run for the loop's current batch; True for the fit's first batch."""
        first, self._batch = self._batch is None, batch_token(trainer)
        return first

    @property
    def active(self) -> bool:
        """False outside a fit, and while the Tuner runs the loop without the callback's hooks."""
        return self.trainer is not None and self._batch == batch_token(self.trainer)

    def params(self, optimizer: torch.optim.Optimizer | None = None) -> list[torch.nn.Parameter]:
        """The parameters of ``optimizer`` (default: the fit's one optimizer), in order."""
        assert self.trainer is not None, "called during a fit"
        optimizer = optimizer or self.trainer.optimizers[0]
        return [p for group in optimizer.param_groups for p in group["params"]]
