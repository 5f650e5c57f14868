"""The loss forms on 2 ranks (gloo): DDP, FSDP1 and FSDP2 fits and a validation with uneven ranks.

Usage: python tests/forms_ranks_fit.py OUT.pt  -- rank 0 saves a dict to OUT.pt: for every fit of ``FITS`` its
label and the full final parameters (gathered on every rank), and under "validate" the logged validation
means. Lightning re-launches this script for rank 1; both ranks run the same fits in the same order in one
process group.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from cases import make_net
from forms import (
    EvalModule,
    FormCase,
    FormModule,
    GlobalLoaderEvalModule,
    fit_form,
    plan_of,
    segments_ranks_case,
    terms_ranks_case,
    weighted_batch,
    weights_ranks_case,
)
from fsdp_fit import CPUFSDPStrategy, GatherParameters, shard_linear_layers
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from reference import flat_parameters

from lightning_accum import SampleCountRescaler

# (label, case, strategy, mode)
FITS = [
    ("weights ddp deferred", weights_ranks_case, "ddp", "deferred"),
    ("weights ddp lookahead", weights_ranks_case, "ddp", "lookahead"),
    ("weights fsdp1 deferred", weights_ranks_case, "fsdp1", "deferred"),
    ("weights fsdp2 deferred", weights_ranks_case, "fsdp2", "deferred"),
    ("weights fsdp2 lookahead", weights_ranks_case, "fsdp2", "lookahead"),
    ("terms ddp lookahead", terms_ranks_case, "ddp", "lookahead"),
    ("segments ddp deferred", segments_ranks_case, "ddp", "deferred"),
    ("segments ddp lookahead", segments_ranks_case, "ddp", "lookahead"),
]
VAL_PLAN = plan_of(weighted_batch, [[5, 5, 1], [3, 2]], tokens=4)  # uneven ranks, short last batches
# 5 sequences dealt in micro-batches of 2 by a GlobalBatchLoader: rank 0 [0, 1] [4], rank 1 [2, 3] and padding.
VAL_SEQUENCES = weighted_batch(5, seed=11, tokens=4)


class FSDP2FormModule(FormModule):
    def configure_model(self) -> None:
        shard_linear_layers(self.net, self.device_mesh["data_parallel"])


class Gather(GatherParameters):
    """``GatherParameters``, and under DDP each rank's (identical) full parameters."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(trainer.strategy, FSDPStrategy | ModelParallelStrategy):
            super().on_train_end(trainer, pl_module)
        else:
            self.parameters = flat_parameters(pl_module.net)


def fit_ranks(case: FormCase, strategy: str, mode: str) -> torch.Tensor:
    gather = Gather()
    module_class = FSDP2FormModule if strategy == "fsdp2" else FormModule
    strategies = {
        "ddp": lambda: "ddp",
        "fsdp1": CPUFSDPStrategy,
        "fsdp2": lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
    }
    fit_form(case, module_class(make_net(), case), [SampleCountRescaler(mode=mode), gather],
             strategy=strategies[strategy]())  # fmt: skip
    assert gather.parameters is not None
    return gather.parameters


if __name__ == "__main__":
    out = Path(sys.argv[1])
    results: dict[str, object] = {label: fit_ranks(case(), strategy, mode) for label, case, strategy, mode in FITS}
    module = EvalModule(make_net(), weights_ranks_case(), VAL_PLAN)
    quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=False,
                         callbacks=[SampleCountRescaler()], **quiet)  # fmt: skip
    (results["validate"],) = trainer.validate(module)
    results["validate net"] = torch.cat([p.detach().reshape(-1) for p in module.net.parameters()])
    module = GlobalLoaderEvalModule(module.net, weights_ranks_case(), VAL_SEQUENCES, replicas=2)
    (results["validate global loader"],) = trainer.validate(module)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        torch.save(results, out)
