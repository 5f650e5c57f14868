"""Fit a named case with strategy="ddp" (Lightning re-launches this script for rank 1).

Usage: python tests/ddp_fit.py CASE exact|naive OUT.pt  -- rank 0 saves the final parameters to OUT.pt.
"""

import sys

import lightning_cases
import torch
from reference import flat_parameters

if __name__ == "__main__":
    case_name, mode, out = sys.argv[1:4]
    case = getattr(lightning_cases, case_name)()
    net = lightning_cases.fit_case(case, exact=mode == "exact", strategy="ddp", devices=2)
    if int(torch.distributed.get_rank()) == 0:
        torch.save(flat_parameters(net), out)
    # A gloo group alive at interpreter shutdown can abort the process after the fit finished.
    torch.distributed.destroy_process_group()
