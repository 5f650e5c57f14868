"""Fit a named case with strategy="ddp" (Lightning re-launches this script for rank 1).

Usage: python tests/ddp_fit.py CASE exact|naive OUT.pt  -- rank 0 saves the final parameters to OUT.pt.
"""

import os
import sys

import cases
import torch
from fits import fit_case
from reference import flat_parameters

if __name__ == "__main__":
    case_name, mode, out = sys.argv[1:4]
    case = getattr(cases, case_name)()
    net = fit_case(case, exact=mode == "exact", strategy="ddp", devices=2)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # the fit's ReleaseProcessGroup already closed the group
        torch.save(flat_parameters(net), out)
