"""The matrix's fits, each run once per session and shared by every assertion on it.

One-process cells are fitted here, when first asked for. The two-rank cells of a strategy are fitted together:
every ``ddp`` cell in one run of this file as a script (Lightning's ``strategy="ddp"`` re-runs it for rank 1),
every ``spawn`` cell in one ``torch.multiprocessing`` spawn of ``spawned_rank``. Every rank runs the same fits in
the same order in one process group (``keep_process_group``); rank 0 saves each fit's final parameters and its
Lightning log (``CSVLogger``) under the run's folder.

Usage: python tests/shared_fits.py FOLDER CELL_ID...  -- the ``ddp`` cells named, on two ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing
from cases import CASES, MATRIX, Cell
from fits import clean_env, fit_mode, free_port, read_metrics
from lightning.pytorch.loggers import CSVLogger
from reference import flat_parameters

CELLS = {cell.id: cell for cell in MATRIX}
LAUNCH_TIMEOUT = 480  # seconds for one launch of every two-rank cell of a strategy


def fit_cells(cell_ids: list[str], folder: Path) -> None:
    """Fit ``cell_ids`` on this rank of a two-rank group; rank 0 saves ``folder/parameters.pt``."""
    torch.set_num_threads(1)
    parameters = {}
    for cell_id in cell_ids:
        cell = CELLS[cell_id]
        logger = CSVLogger(folder / "logs", name=cell_id, version=0)
        net, _ = fit_mode(CASES[cell.case](), cell.mode, cell.precision, strategy="ddp", devices=2,
                          logger=logger, keep_process_group=True)  # fmt: skip
        parameters[cell_id] = flat_parameters(net)
    torch.distributed.barrier()
    rank = torch.distributed.get_rank()
    torch.distributed.destroy_process_group()  # one process group served every fit
    if rank == 0:
        torch.save(parameters, folder / "parameters.pt")


def spawned_rank(rank: int, cell_ids: list[str], folder: Path, port: int) -> None:
    """A rank started by the spawn: the launcher's variables (as ``ddp_spawn`` sets them), then the fits."""
    set_rank_environment(rank, port)
    fit_cells(cell_ids, folder)


def set_rank_environment(rank: int, port: int, **extra: str) -> None:
    """The launcher's variables of rank ``rank`` of two on this host, as ``ddp_spawn`` sets them."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", NODE_RANK="0",
        RANK=str(rank), LOCAL_RANK=str(rank), **extra,
    )  # fmt: skip


def launch_ddp(cell_ids: list[str], folder: Path) -> None:
    script = Path(__file__).resolve()
    proc = subprocess.run([sys.executable, str(script), str(folder), *cell_ids], cwd=folder, env=clean_env(),
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"the ddp launch of {len(cell_ids)} cells failed:\n{proc.stderr[-6000:]}")


def spawn_two_ranks(target: Callable[..., None], args: tuple, what: str, timeout_s: float = LAUNCH_TIMEOUT) -> None:
    """Run ``target(rank, *args)`` in two spawned processes and wait for both; kill them when one fails or
    they run past ``timeout_s``."""
    context = torch.multiprocessing.start_processes(target, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} ran past {timeout_s} s")
    except BaseException:
        for process in context.processes:
            if process.is_alive():
                process.kill()
        raise


def launch_spawn(cell_ids: list[str], folder: Path) -> None:
    spawn_two_ranks(spawned_rank, (cell_ids, folder, free_port()), f"the spawn of {len(cell_ids)} cells")


LAUNCHERS = {"ddp": launch_ddp, "spawn": launch_spawn}


class SharedFits:
    """Final parameters (and logs) of matrix cells, each fitted once: ``wanted`` cells of a launch strategy are
    fitted together the first time one of them is asked for."""

    def __init__(self, folder: Path, wanted: list[Cell]) -> None:
        self.folder = folder
        self.wanted = wanted
        self.parameters_of: dict[str, torch.Tensor] = {}
        self.failed: dict[str, BaseException] = {}

    def parameters(self, cell: Cell) -> torch.Tensor:
        if cell.id not in self.parameters_of:
            if cell.strategy == "single":
                net, _ = fit_mode(CASES[cell.case](), cell.mode, cell.precision)
                self.parameters_of[cell.id] = flat_parameters(net)
            else:
                self._launch(cell)
        return self.parameters_of[cell.id]

    def logs(self, cell: Cell) -> list[dict[str, str]]:
        """The rows of the two-rank ``cell``'s ``metrics.csv``."""
        assert cell.strategy != "single", "one-process cells are fitted without a logger"
        self.parameters(cell)
        return read_metrics(CSVLogger(self._folder(cell.strategy) / "logs", name=cell.id, version=0))

    def _folder(self, strategy: str) -> Path:
        return self.folder / strategy

    def _launch(self, cell: Cell) -> None:
        if cell.strategy in self.failed:  # one failed launch fails every cell it served, without a relaunch
            raise RuntimeError(f"the {cell.strategy} launch failed") from self.failed[cell.strategy]
        cell_ids = list(dict.fromkeys([c.id for c in self.wanted if c.strategy == cell.strategy] + [cell.id]))
        cell_ids = [c for c in cell_ids if c not in self.parameters_of]
        folder = self._folder(cell.strategy)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            LAUNCHERS[cell.strategy](cell_ids, folder)
        except BaseException as error:
            self.failed[cell.strategy] = error
            raise
        self.parameters_of.update(torch.load(folder / "parameters.pt"))


if __name__ == "__main__":
    fit_cells(sys.argv[2:], Path(sys.argv[1]))
