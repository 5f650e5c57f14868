"""One fit of ``elastic.ElasticModule`` on the ranks that torchrun or srun started, for the elastic and requeue tests.

Usage: python tests/elastic_fit.py ROOT OUT [--b B] [--mode M] [--grouped] [--stop-step N] [--resume CKPT]
[--every-step] [--kill-rank R --kill-step S] [--slow SECONDS]

The split follows the ranks: K = 8 / (ranks x B), so every launch trains the same windows of 8 samples. Under Slurm
(``SLURM_NTASKS``) the Trainer gets ``SLURMEnvironment(auto_requeue=True)`` and ``StepBoundaryRequeue``, and a
requeued job resumes from its HPC checkpoint in ROOT; ``--every-step`` saves ``ROOT/last.ckpt`` at every optimizer
step and resumes from it when it exists (torchrun restarts). ``--kill-rank``/``--kill-step`` SIGKILLs that rank inside
the window after step S, on torchrun's first attempt only. Rank 0 writes the final parameters to OUT when the fit
ran to its end, ROOT/progress.txt (``global_step world_size``) after every step and a line
``attempt global_step world_size`` to ROOT/starts.txt at every train start.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch
from elastic import EPOCHS, ElasticModule, SaveAtStep, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from reference import flat_parameters

from lightning_accum import StepBoundaryRequeue

EFFECTIVE, STEPS = 8, 4 * EPOCHS


class Progress(pl.Callback):
    """Rank 0 writes ``global_step world_size`` after each step; every rank sleeps ``slow`` s per batch; one rank
    kills itself inside the window after ``kill_step`` on torchrun's first attempt."""

    def __init__(self, path: Path, slow: float, kill: tuple[int, int] | None) -> None:
        self.path, self.slow, self.kill = path, slow, kill

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.is_global_zero:  # which attempt starts at which step, on how many ranks
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", os.environ.get("SLURM_RESTART_COUNT", "0"))
            with (self.path.parent / "starts.txt").open("a") as starts:
                starts.write(f"{attempt} {trainer.global_step} {trainer.world_size}\n")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        within = trainer.fit_loop.epoch_loop.batch_progress.current.ready % trainer.accumulate_grad_batches
        if self.kill and first_attempt and (trainer.global_rank, trainer.global_step) == self.kill and within == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        time.sleep(self.slow)
        if trainer.is_global_zero:  # written whole, then renamed: a poll never reads a truncated file
            partial = self.path.with_suffix(".partial")
            partial.write_text(f"{trainer.global_step} {trainer.world_size}\n")
            partial.replace(self.path)


def ranks_per_node_and_nodes() -> tuple[int, int]:
    if "LOCAL_WORLD_SIZE" in os.environ:  # torchrun
        local = int(os.environ["LOCAL_WORLD_SIZE"])
        return local, int(os.environ["WORLD_SIZE"]) // local
    if "SLURM_NTASKS" in os.environ:
        nodes = int(os.environ["SLURM_NNODES"])
        return int(os.environ["SLURM_NTASKS"]) // nodes, nodes
    return 1, 1


def join_this_attempt() -> None:
    """Under torchrun, start the gloo group on a store of this attempt's own (``--max-restarts``).

    The workers of every attempt share the agent's store; a restarted rank could read the gloo address that a
    killed rank published in the previous attempt and fail to connect ("Gloo connectFullMesh failed ...
    Connection refused", torch 2.13). Lightning keeps a process group that is already up.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, False, timedelta(seconds=120)
    )
    attempt = torch.distributed.PrefixStore(f"attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", agent)
    torch.distributed.init_process_group("gloo", store=attempt, rank=rank, world_size=world_size)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--b", type=int, default=2)
    parser.add_argument("--mode", default="deferred")
    parser.add_argument("--grouped", action="store_true")
    parser.add_argument("--stop-step", type=int)
    parser.add_argument("--resume")
    parser.add_argument("--every-step", action="store_true")
    parser.add_argument("--kill-rank", type=int)
    parser.add_argument("--kill-step", type=int)
    parser.add_argument("--slow", type=float, default=0.0)
    args = parser.parse_args()

    devices, nodes = ranks_per_node_and_nodes()
    join_this_attempt()
    k = EFFECTIVE // (devices * nodes * args.b)
    assert devices * nodes * k * args.b == EFFECTIVE, f"{devices * nodes} ranks x B={args.b} do not divide 8"
    kill = None if args.kill_rank is None else (args.kill_rank, args.kill_step)
    callbacks: list[pl.Callback] = [Progress(args.root / "progress.txt", args.slow, kill)]
    kwargs = {"default_root_dir": str(args.root), "num_nodes": nodes}
    if args.stop_step is not None:
        callbacks.append(SaveAtStep(args.root / "split.ckpt", args.stop_step))
    ckpt_path = args.resume
    if args.every_step:
        callbacks.append(ModelCheckpoint(dirpath=args.root, every_n_train_steps=1, save_last=True, save_top_k=0))
        kwargs["enable_checkpointing"] = True
        if (args.root / "last.ckpt").exists():
            ckpt_path = str(args.root / "last.ckpt")
    if "SLURM_NTASKS" in os.environ:
        callbacks.append(StepBoundaryRequeue())
        kwargs["plugins"] = [SLURMEnvironment(auto_requeue=True)]
    strategy = "ddp" if devices * nodes > 1 else "auto"
    fit = trainer(devices, k, callbacks, args.mode, strategy=strategy, **kwargs)
    module = ElasticModule(k, args.b, args.grouped)
    fit.fit(module, ckpt_path=ckpt_path)
    if fit.global_rank == 0 and fit.global_step == STEPS:
        torch.save(flat_parameters(module.net), args.out)


if __name__ == "__main__":
    main()
