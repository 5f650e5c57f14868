"""Fit two ranks with ``sizes`` micro-batches under strategy="ddp"; every rank records the error that ends it.

Usage: python tests/ddp_uneven_fit.py N0 N1 K FOLDER  -- each rank writes its exception to FOLDER/rank<R>.txt.
Under "ddp" every rank handles its own exception (under "ddp_spawn" only the parent process does).
"""

import sys
from pathlib import Path

from cases import make_net, uneven_case
from fits import CountingModule, RecordException, fit

from lightning_accum import SampleCountRescaler

if __name__ == "__main__":
    n0, n1, k, folder = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    case = uneven_case((n0, n1), k)
    fit(case, CountingModule(make_net(), case), [SampleCountRescaler(), RecordException(folder)], "ddp", 2)
