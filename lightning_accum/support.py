"""Which strategies and precision plugins the rescaler is verified with; everything else fails at setup."""

from __future__ import annotations

from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
    Strategy,
    XLAStrategy,
)

SUPPORTED_STRATEGIES: tuple[type[Strategy], ...] = (SingleDeviceStrategy, DDPStrategy)
# Subclasses of the above that own the optimizer step or run elsewhere; none is verified.
UNVERIFIED_SUBCLASSES: tuple[type[Strategy], ...] = (DeepSpeedStrategy, XLAStrategy, SingleDeviceXLAStrategy)
SUPPORTED_PRECISIONS: tuple[type[Precision], ...] = (Precision, DoublePrecision, MixedPrecision, HalfPrecision)


def require_supported_strategy(strategy: Strategy) -> None:
    """Raise unless the rescale can see the summed gradients of ``strategy`` before its optimizer step.

    Example::

        >>> from lightning.pytorch.strategies import SingleDeviceStrategy
        >>> require_supported_strategy(SingleDeviceStrategy("cpu"))
    """
    if not isinstance(strategy, SUPPORTED_STRATEGIES) or isinstance(strategy, UNVERIFIED_SUBCLASSES):
        raise RuntimeError(
            f"SampleCountRescaler does not support the {type(strategy).__name__} strategy yet: it must "
            "see the summed gradients before the optimizer step, and is only verified where it does. Use a "
            "single device or strategy='ddp' / 'ddp_spawn' (either mode, any precision)."
        )


def require_supported_precision(plugin: Precision) -> None:
    """Raise unless ``plugin`` is one of Lightning's 64/32-true, 16/bf16-mixed or 16/bf16-true plugins.

    Example::

        >>> from lightning.pytorch.plugins.precision import HalfPrecision
        >>> require_supported_precision(HalfPrecision("bf16-true"))
    """
    if type(plugin) not in SUPPORTED_PRECISIONS:
        raise RuntimeError(
            f"SampleCountRescaler is not verified with the {type(plugin).__name__} precision plugin. Use "
            "precision='32-true', '64-true', '16-mixed', 'bf16-mixed', '16-true' or 'bf16-true'."
        )
