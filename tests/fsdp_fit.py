"""Fit the two-rank cases under FSDP1 (``FSDPStrategy``) or FSDP2 (``ModelParallelStrategy`` + ``fully_shard``).

Usage: python tests/fsdp_fit.py fsdp1|fsdp2|fsdp1,fsdp2 OUT.pt [DEVICE]  -- rank 0 saves a dict to OUT.pt (per
version: ``{version}`` in OUT.pt is replaced by its name): for every fit of ``FITS`` its label and the full final
parameters (gathered on every rank), plus under "refused" the error that a checkpoint inside a window raised.
Lightning re-launches this script for rank 1 (as for strategy="ddp"); every rank runs the same fits in the same
order, so one launch and one process group serve them all, of both versions. DEVICE is "cpu" (gloo, the CI) or
"cuda" (the GPU suite: 2 ranks need 2 GPUs with NCCL).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from cases import Case, clipped_ranks_case, make_net, masked_ranks_case, partial_window_ranks_case, uneven_ranks_case
from fits import CountingModule, NaiveModule, fit
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from lightning_accum import SampleCountRescaler

# (label, case, kind, precision, mode): every fit of one script run.
FITS = [
    ("masked_ranks 32-true deferred", masked_ranks_case, "exact", "32-true", "deferred"),
    ("masked_ranks 32-true lookahead", masked_ranks_case, "exact", "32-true", "lookahead"),
    ("masked_ranks bf16-mixed deferred", masked_ranks_case, "exact", "bf16-mixed", "deferred"),
    ("masked_ranks bf16-mixed lookahead", masked_ranks_case, "exact", "bf16-mixed", "lookahead"),
    ("uneven_ranks 32-true deferred", uneven_ranks_case, "exact", "32-true", "deferred"),
    ("partial_window 32-true deferred", partial_window_ranks_case, "exact", "32-true", "deferred"),
    ("partial_window 32-true lookahead", partial_window_ranks_case, "exact", "32-true", "lookahead"),
    ("clipped_ranks 32-true deferred", clipped_ranks_case, "exact", "32-true", "deferred"),
    ("clipped_ranks 32-true lookahead", clipped_ranks_case, "exact", "32-true", "lookahead"),
    ("masked_ranks 32-true naive", masked_ranks_case, "naive", "32-true", "deferred"),
]


class CPUFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` for the CPU tests only; users on GPUs pass ``FSDPStrategy`` (or strategy="fsdp") itself.

    Lightning refuses ``FSDPStrategy`` on CPU with an exact type check (a subclass passes), and wraps the model
    with ``device_id=root_device.index`` (``None`` on CPU), which torch's FSDP1 rejects there: this wraps it with
    ``device_id=torch.device("cpu")`` first, and Lightning then keeps the wrapped model.
    """

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        return super()._setup_model(wrapped)


class FSDP1ClipModule(CountingModule):
    """FSDP1 clips by norm through the wrapped module (Lightning's ``FSDPPrecision`` refuses the plain clip)."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if self.case.clip_norm is not None:
            self.trainer.strategy.model.clip_grad_norm_(self.case.clip_norm)


class FSDP1NaiveModule(NaiveModule, FSDP1ClipModule):
    pass


def shard_linear_layers(net: nn.Sequential, mesh: object) -> None:
    """FSDP2: shard each linear layer of ``net``, then ``net`` itself, over the data-parallel ``mesh``."""
    from torch.distributed.fsdp import fully_shard

    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)


class FSDP2Module(CountingModule):
    """Shards each linear layer and the net over the data-parallel mesh (FSDP2)."""

    def configure_model(self) -> None:
        shard_linear_layers(self.net, self.device_mesh["data_parallel"])


class FSDP2NaiveModule(NaiveModule, FSDP2Module):
    pass


class GatherParameters(pl.Callback):
    """At the fit's end (every rank, before the process group goes): the full parameters, flat, on the CPU."""

    def __init__(self) -> None:
        self.parameters: torch.Tensor | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = pl_module.net
        if isinstance(trainer.strategy, FSDPStrategy):
            from torch.distributed.fsdp import FullyShardedDataParallel

            with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
                full = [p.detach().reshape(-1).float().cpu().clone() for p in net.parameters()]
        else:
            full = [p.full_tensor().detach().reshape(-1).float().cpu() for p in net.parameters()]
        self.parameters = torch.cat(full)


class SaveMidWindow(pl.Callback):
    """Saves a checkpoint two micro-batches into the first window (K=3)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == 1:
            trainer.save_checkpoint(self.path)


def make_strategy(version: str, device: str, ranks: int = 2, **fsdp_kwargs) -> pl.strategies.Strategy:
    if version == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=ranks, tensor_parallel_size=1)
    return CPUFSDPStrategy(**fsdp_kwargs) if device == "cpu" else FSDPStrategy(**fsdp_kwargs)


def module_for(version: str, kind: str, case: Case) -> pl.LightningModule:
    classes = {
        ("fsdp1", "exact"): FSDP1ClipModule,
        ("fsdp1", "naive"): FSDP1NaiveModule,
        ("fsdp2", "exact"): FSDP2Module,
        ("fsdp2", "naive"): FSDP2NaiveModule,
    }
    return classes[(version, kind)](make_net(), case)


def fit_sharded(
    version: str,
    device: str,
    case: Case,
    kind: str,
    precision: str,
    mode: str,
    keep_process_group: bool = True,
    **fsdp_kwargs,
) -> torch.Tensor:
    """Fit ``case`` (one rank per entry of ``case.plan``) under FSDP ``version``; the final full parameters."""
    ranks = len(case.plan)
    gather = GatherParameters()
    callbacks: list[pl.Callback] = [gather] if kind == "naive" else [SampleCountRescaler(mode=mode), gather]
    clip = {"gradient_clip_val": None} if version == "fsdp1" else {}  # FSDP1 clips in configure_gradient_clipping
    fit(case, module_for(version, kind, case), callbacks, make_strategy(version, device, ranks, **fsdp_kwargs), ranks,
        precision=precision, accelerator=device, keep_process_group=keep_process_group, **clip)  # fmt: skip
    assert gather.parameters is not None
    return gather.parameters


def refused_mid_window_checkpoint(version: str, device: str, folder: Path) -> str:
    """The error of a checkpoint saved inside a window (every rank raises it). FSDP1 saves sharded checkpoints
    here: its full state dict crashes torch 2.13 on CPU (a segmentation fault, with or without the rescaler)."""
    case = masked_ranks_case()
    module = module_for(version, "exact", case)
    clip = {"gradient_clip_val": None} if version == "fsdp1" else {}
    try:
        fit(case, module, [SampleCountRescaler(), SaveMidWindow(folder / "mid.ckpt")],
            make_strategy(version, device, state_dict_type="sharded"), 2, accelerator=device,
            keep_process_group=True, **clip)  # fmt: skip
    except RuntimeError as error:
        return str(error)
    return ""


def fit_version(version: str, device: str) -> dict[str, object]:
    """Every fit of ``FITS`` under ``version`` (and, for FSDP1, its other sharding strategies); label -> parameters."""
    results: dict[str, object] = {}
    for label, case_fn, kind, precision, mode in FITS:
        results[label] = fit_sharded(version, device, case_fn(), kind, precision, mode)
    if version == "fsdp1":  # FSDP1's other sharding strategies that the rescaler accepts
        for sharding in ("SHARD_GRAD_OP", "NO_SHARD"):
            parameters = fit_sharded(version, device, masked_ranks_case(), "exact", "32-true", "deferred",
                                     sharding_strategy=sharding)  # fmt: skip
            results[f"masked_ranks 32-true deferred {sharding}"] = parameters
    return results


if __name__ == "__main__":
    versions, out = sys.argv[1].split(","), sys.argv[2]
    device = sys.argv[3] if len(sys.argv) > 3 else "cpu"
    results = {version: fit_version(version, device) for version in versions}
    for version in versions:  # the refusals last: every fit that trains ran before the first raised
        results[version]["refused"] = refused_mid_window_checkpoint(version, device, Path(out).parent)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # one process group served every fit (see keep_process_group)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        for version in versions:
            torch.save(results[version], out.replace("{version}", version))
