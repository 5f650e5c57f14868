"""Two DDP ranks on one GPU over gloo (NCCL refuses two ranks on one GPU), for the GPU suite.

Usage: python tests/gpu_ddp_fit.py OUT.pt  -- started once per rank by ``test_gpu.py`` with NODE_RANK=0|1,
LOCAL_RANK=0, MASTER_ADDR and MASTER_PORT set: each rank is a "node" with one device, cuda:0, so Lightning
starts no process itself. Rank 0 saves {label: final flat parameters} for every fit of ``FITS``.
"""

from __future__ import annotations

import os
import sys

import torch
from cases import make_net, masked_ranks_case
from fits import CountingModule, fit, precision_kwargs
from lightning.pytorch.strategies import DDPStrategy
from reference import flat_parameters

from lightning_accum import SampleCountRescaler

FITS = [("32-true", "deferred"), ("32-true", "lookahead"), ("bf16-mixed", "deferred"), ("16-mixed", "deferred")]

if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 products as the CPU reference computes them
    results = {}
    for precision, mode in FITS:
        case = masked_ranks_case()
        module = CountingModule(make_net(), case)
        strategy = DDPStrategy(process_group_backend="gloo")
        fit(case, module, [SampleCountRescaler(mode=mode)], strategy, 1, accelerator="gpu", num_nodes=2,
            keep_process_group=True, **precision_kwargs(precision, "cuda"))  # fmt: skip
        results[f"{precision} {mode}"] = flat_parameters(module.net).float().cpu()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    if int(os.environ["NODE_RANK"]) == 0:
        torch.save(results, sys.argv[1])
