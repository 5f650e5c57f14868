"""``LoggedNameCheck``: a key the rescaler logs that another ``self.log`` call logs too, reported once."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_accum.lightning_internals import logged_keys

LOGGING_HOOK = "on_before_optimizer_step"  # the hook in which the rescaler logs its keys
MEANINGS = {
    "loss_name": "the item-mean loss of each optimizer step",
    "items_name": "the number of items each optimizer step counted",
    "epoch_loss_name": "the item-weighted mean loss of the epoch",
}


def collision_message(argument: str, key: str, hooks: list[str]) -> str:
    """What a key logged both by the rescaler (as ``argument``) and in ``hooks`` means, and the fix.

    Examples:
        >>> print(collision_message("loss_name", "train/loss", ["training_step"]))  # doctest: +ELLIPSIS
        SampleCountRescaler logs 'train/loss' (the item-mean loss of each optimizer step), and self.log in \
training_step logs the same key: ... SampleCountRescaler(loss_name='train/loss_exact') ...
    """
    return (
        f"SampleCountRescaler logs {key!r} ({MEANINGS[argument]}), and self.log in {' and '.join(hooks)} logs "
        "the same key: loggers, trainer.callback_metrics and monitors (ModelCheckpoint, EarlyStopping) then hold "
        f"two different values under one name. Rename one of them: SampleCountRescaler({argument}={key + '_exact'!r}) "
        "(or any key nothing else logs), or the key of the other self.log call."
    )


class LoggedNameCheck:
    """Warns once (rank 0) when another hook logs one of the rescaler's keys, naming the argument that renames it.

    Called after the rescaler logs a step; it reads what the active loop has logged so far, so a key that a
    module logs in ``training_step`` (per step or per epoch) is found at the first optimizer step.

    Args:
        loss_name: the rescaler's key of the per-step item-mean loss.
        items_name: its key of the per-step item count.
        epoch_loss_name: its key of the epoch's item-weighted mean loss.

    Examples:
        >>> check = LoggedNameCheck("train/loss", "train/items", "train/loss_epoch")
        >>> check.collisions([("on_before_optimizer_step", "train/loss"), ("training_step", "train/acc")])
        {}
        >>> check.collisions([("training_step", "train/loss_step"), ("training_step", "train/loss_epoch")])
        {'epoch_loss_name': ['training_step']}
    """

    def __init__(self, loss_name: str, items_name: str, epoch_loss_name: str) -> None:
        self.keys = {"loss_name": loss_name, "items_name": items_name, "epoch_loss_name": epoch_loss_name}
        self.warned = False

    def collisions(self, logged: list[tuple[str, str]]) -> dict[str, list[str]]:
        """The rescaler's arguments whose key another hook logged, each with those hooks (from ``logged_keys``)."""
        found: dict[str, list[str]] = {}
        for argument, key in self.keys.items():
            hooks = sorted({hook for hook, logged_key in logged if logged_key == key and hook != LOGGING_HOOK})
            if hooks:
                found[argument] = hooks
        return found

    def __call__(self, trainer: pl.Trainer) -> None:
        """Warn about the first collisions found in ``trainer``'s logged keys; afterwards do nothing."""
        if self.warned:
            return
        found = self.collisions(logged_keys(trainer))
        for argument, hooks in found.items():
            rank_zero_warn(collision_message(argument, self.keys[argument], hooks), category=UserWarning)
        self.warned = bool(found)
