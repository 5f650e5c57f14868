"""Stop an optimizer step whose window the rescaler did not finish: a raw optimizer bypasses Lightning's hooks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

RAW_STEP_MESSAGE = (
    "The optimizer stepped without Lightning's on_before_optimizer_step, so SampleCountRescaler could not make "
    "its gradient the item mean (a raw optimizer, e.g. `self.optimizers(use_pl_optimizer=False)`). Step the "
    "LightningOptimizer that `self.optimizers()` returns."
)


def guard_raw_steps(optimizer: torch.optim.Optimizer, stepped_unfinished: Callable[[], bool]) -> RemovableHandle:
    """Raise after any step of ``optimizer`` for which ``stepped_unfinished()`` is true; remove the handle to stop.

    A step post-hook, because in 32-bit Lightning runs the closure (and so ``on_before_optimizer_step``) inside
    ``optimizer.step``, after its pre-hooks.

    Examples:
        >>> weight = torch.nn.Parameter(torch.ones(1))
        >>> optimizer = torch.optim.SGD([weight], lr=0.1)
        >>> handle = guard_raw_steps(optimizer, lambda: True)
        >>> optimizer.step()
        Traceback (most recent call last):
        ...
        RuntimeError: The optimizer stepped without Lightning's on_before_optimizer_step, ...
        >>> handle.remove()
        >>> optimizer.step()
    """

    def check(stepped: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if stepped_unfinished():
            raise RuntimeError(RAW_STEP_MESSAGE)

    return optimizer.register_step_post_hook(check)
