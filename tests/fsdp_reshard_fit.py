"""Sharded and full FSDP checkpoints resumed on another number of ranks, for ``test_fsdp_reshard``.

Usage: python tests/fsdp_reshard_fit.py RANKS ROOT  -- for every case of ``CASES`` (RANKS is 1 or 2): resume
ROOT/<case>-<other>ranks.ckpt when it exists, on RANKS ranks, and keep the final full parameters; then, unless
it exists, save ROOT/<case>-<RANKS>ranks.ckpt at global step ``MID_EPOCH`` (mid-epoch, a step boundary) and
stop. Rank 0 writes ``{"<case> <from>-><to>": parameters}`` to ROOT/resumed-<RANKS>.pt. Run it on 2 ranks
(saves), 1 (resumes 2 -> 1, saves) and 2 again (resumes 1 -> 2). The data, module, split rule (E = 8:
2 ranks x K=2 x B=2, 1 rank x K=4 x B=2) and reference are ``elastic``'s; Lightning re-launches the script for
rank 1, and every fit of a launch shares one process group.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from elastic import EPOCHS, MID_EPOCH, ElasticModule, SaveAtStep
from fits import QUIET_TRAINER
from fsdp_fit import CPUFSDPStrategy, GatherParameters, shard_linear_layers
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_accum import SampleCountRescaler

EFFECTIVE, MICRO_BATCH = 8, 2
# (FSDP version, checkpoint kind, rescaler mode; lookahead resumes the same, 1.4e-7 and 1.5e-7, left out for
# time): "sharded" is FSDP1's state_dict_type="sharded" and FSDP2's
# distributed checkpoint (a folder of shards), "full" a single file of full state dicts.
CASES = [
    ("fsdp1", "sharded", "deferred"),
    ("fsdp1", "full", "deferred"),
    ("fsdp2", "sharded", "deferred"),
    ("fsdp2", "full", "deferred"),
]
# torch 2.13 on CPU (gloo) crashes saving FSDP1's full state dict on 2 ranks (a segmentation fault, see
# fsdp_fit.refused_mid_window_checkpoint): that case saves on 1 rank only, and is resumed 1 -> 2.
SAVED_ON_ONE_RANK_ONLY = {("fsdp1", "full")}


class FSDP2ElasticModule(ElasticModule):
    """``ElasticModule`` with each linear layer and the net sharded over the data-parallel mesh (FSDP2)."""

    def configure_model(self) -> None:
        shard_linear_layers(self.net, self.device_mesh["data_parallel"])


def make_strategy(version: str, kind: str, ranks: int) -> pl.strategies.Strategy:
    if version == "fsdp2":
        return ModelParallelStrategy(
            data_parallel_size=ranks, tensor_parallel_size=1, save_distributed_checkpoint=kind == "sharded"
        )
    return CPUFSDPStrategy(state_dict_type=kind)


def fit_case(case: tuple[str, str, str], ranks: int, callbacks: list[pl.Callback], ckpt_path: Path | None = None):
    """Fit ``case`` on ``ranks`` ranks (K = 8 / (ranks x 2)), resuming ``ckpt_path``; the final full parameters."""
    version, kind, mode = case
    k = EFFECTIVE // (ranks * MICRO_BATCH)
    module = (FSDP2ElasticModule if version == "fsdp2" else ElasticModule)(k, MICRO_BATCH)
    gather = GatherParameters()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=ranks,
        strategy=make_strategy(version, kind, ranks),
        max_epochs=EPOCHS,
        accumulate_grad_batches=k,
        use_distributed_sampler=False,
        callbacks=[SampleCountRescaler(mode=mode), *callbacks, gather],
        **QUIET_TRAINER,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return gather.parameters


if __name__ == "__main__":
    ranks, root = int(sys.argv[1]), Path(sys.argv[2])
    other = 3 - ranks
    resumed = {}
    for case in CASES:
        name = "-".join(case)
        saved = root / f"{name}-{other}ranks.ckpt"
        if saved.exists():
            resumed[f"{' '.join(case)} {other}->{ranks}"] = fit_case(case, ranks, [], saved)
        own = root / f"{name}-{ranks}ranks.ckpt"
        if not own.exists() and not (case[:2] in SAVED_ON_ONE_RANK_ONLY and ranks > 1):
            fit_case(case, ranks, [SaveAtStep(own, MID_EPOCH)])
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        torch.save(resumed, root / f"resumed-{ranks}.pt")
