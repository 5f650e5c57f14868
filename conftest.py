"""Collection settings for the whole checkout: the Numba kernels' module imports Numba (the `fast` extra)."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("numba") else ["lightning_accum/data/_pass_kernels.py"]
