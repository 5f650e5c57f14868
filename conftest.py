"""Collection settings for the whole checkout: the Numba kernels' module imports Numba (the `fast` extra)."""

try:
    import numba  # noqa: F401
except ImportError:
    collect_ignore = ["lightning_accum/data/_pass_kernels.py"]
