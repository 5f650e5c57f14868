"""The weighting engines without a Trainer: the test plays Lightning (loss / K, zero_grad) and DDP (grad mean).

Expected gradients are plain autograd of the item mean over the window's union of items, computed apart from
the engines.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from lightning_accum.counting import masked_sum_and_count
from lightning_accum.engines import DeferredEngine, LookaheadEngine, WeightingEngine
from lightning_accum.run import Run
from lightning_accum.totals import Verdict

FEATURES = 3
MicroBatch = tuple[Tensor, Tensor]  # (inputs [n, FEATURES], mask [n])


def micro_batches(sizes: Sequence[int], keep: float = 0.7, seed: int = 0) -> list[MicroBatch]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, FEATURES, generator=gen), torch.rand(n, generator=gen) < keep) for n in sizes]


def item_losses(w: Tensor, x: Tensor) -> Tensor:
    return torch.tanh(x @ w) ** 2 + (x @ w)


def expected_gradient(w0: Tensor, window: Sequence[MicroBatch]) -> Tensor:
    """Plain autograd of the mean over every counted item of the window."""
    w = w0.clone().requires_grad_(True)
    losses = torch.cat([item_losses(w, x)[mask] for x, mask in window])
    losses.mean().backward()
    return w.grad


def count_items(batch: MicroBatch) -> Tensor:
    return batch[1].sum()


def run_window(engine: WeightingEngine, w: Tensor, window: Sequence[MicroBatch], k: int, first_batch_idx: int = 0):
    """One window as Lightning runs it: each micro-batch's loss divided by K, backpropagated; then the step."""
    for offset, batch in enumerate(window):
        batch_idx = first_batch_idx + offset
        engine.start_micro_batch(batch_idx, batch, upcoming=lambda n, i=offset: window[i + 1 :][:n])
        x, mask = batch
        loss = engine.micro_batch_loss(*masked_sum_and_count(item_losses(w, x), mask))
        engine.check_backward(loss)
        (loss / k).backward()
    return engine.finish_window([w], ends_epoch=False, epoch_batches=float("inf"))


def fresh(engine_type: type[WeightingEngine], k: int) -> WeightingEngine:
    engine = engine_type()
    run = Run.single_process(accumulate_grad_batches=k)
    run.count_items = count_items
    engine.begin_fit(run)
    return engine


@pytest.mark.parametrize("engine_type", [DeferredEngine, LookaheadEngine])
@pytest.mark.parametrize("sizes", [[5], [7, 1, 4], [2, 9, 3, 1], [1, 1, 1, 1, 12]], ids=str)
def test_one_window_is_the_item_mean(engine_type, sizes) -> None:
    window = micro_batches(sizes)
    w0 = torch.randn(FEATURES, generator=torch.Generator().manual_seed(1))
    w = w0.clone().requires_grad_(True)
    finished = run_window(fresh(engine_type, len(sizes)), w, window, k=len(sizes))
    torch.testing.assert_close(w.grad, expected_gradient(w0, window), rtol=1e-6, atol=1e-7)
    assert finished.totals.items.item() == sum(int(mask.sum()) for _, mask in window)
    assert finished.verdict == Verdict(0)


@pytest.mark.parametrize("engine_type", [DeferredEngine, LookaheadEngine])
def test_windows_after_windows_with_zero_grad_between(engine_type) -> None:
    windows = [micro_batches([3, 5], seed=s) for s in range(3)]
    w0 = torch.randn(FEATURES)
    engine = fresh(engine_type, 2)
    for i, window in enumerate(windows):
        w = w0.clone().requires_grad_(True)
        engine.forget_window()  # Lightning zeroes the gradients at the window's first micro-batch
        run_window(engine, w, window, k=2, first_batch_idx=2 * i)
        torch.testing.assert_close(w.grad, expected_gradient(w0, window), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("engine_type", [DeferredEngine, LookaheadEngine])
def test_an_empty_window_drops_the_gradients(engine_type) -> None:
    window = [(x, torch.zeros_like(mask)) for x, mask in micro_batches([3, 2])]
    w = torch.randn(FEATURES, requires_grad=True)
    finished = run_window(fresh(engine_type, 2), w, window, k=2)
    assert finished.empty and w.grad is None
    assert finished.mean_loss.isnan()


@pytest.mark.parametrize("engine_type", [DeferredEngine, LookaheadEngine])
def test_a_loss_that_no_backward_carries_counts_nothing(engine_type) -> None:
    window = micro_batches([4, 6, 2])
    w0 = torch.randn(FEATURES)
    w = w0.clone().requires_grad_(True)
    engine = fresh(engine_type, 3)
    for offset, (x, mask) in enumerate(window):
        engine.start_micro_batch(offset, (x, mask), upcoming=lambda n, i=offset: window[i + 1 :][:n])
        loss = engine.micro_batch_loss(*masked_sum_and_count(item_losses(w, x), mask))
        if offset != 1:  # the second micro-batch is skipped (training_step returns None)
            (loss / 3).backward()
    engine.finish_window([w], ends_epoch=False, epoch_batches=3.0)
    torch.testing.assert_close(w.grad, expected_gradient(w0, [window[0], window[2]]), rtol=1e-6, atol=1e-7)


def test_lookahead_refuses_a_count_rule_that_drifts_from_the_mask() -> None:
    engine = fresh(LookaheadEngine, 2)
    engine.run.count_items = lambda batch: torch.tensor(len(batch[1]))  # counts masked-out items too
    window = micro_batches([4, 5])
    with pytest.raises(RuntimeError, match=r"count_items counted 9 items .* masks counted \d+"):
        run_window(engine, torch.randn(FEATURES, requires_grad=True), window, k=2)


def test_lookahead_refuses_to_start_inside_a_window() -> None:
    engine = fresh(LookaheadEngine, 3)
    with pytest.raises(RuntimeError, match=r"cannot start in the middle of a window \(batch 4, K=3\)"):
        engine.start_micro_batch(4, micro_batches([2])[0], upcoming=lambda n: [])


def test_outputs_backpropagated_with_different_weights_are_refused() -> None:
    engine = fresh(DeferredEngine, 2)
    w = torch.randn(FEATURES, requires_grad=True)
    for offset, (x, mask) in enumerate(micro_batches([3, 3])):
        engine.start_micro_batch(offset, (x, mask), upcoming=lambda n: [])
        loss = engine.micro_batch_loss(*masked_sum_and_count(item_losses(w, x), mask))
        ((1 + offset) * loss / 2).backward()  # the second micro-batch weighs twice the first
    with pytest.raises(RuntimeError, match="backpropagated with different weights"):
        engine.finish_window([w], ends_epoch=False, epoch_batches=2.0)


def test_a_partial_window_restored_continues_exactly() -> None:
    window = micro_batches([3, 4, 5])
    w0 = torch.randn(FEATURES)
    saved = fresh(DeferredEngine, 3)
    w = w0.clone().requires_grad_(True)
    for offset, (x, mask) in enumerate(window[:2]):
        saved.start_micro_batch(offset, (x, mask), upcoming=lambda n: [])
        (saved.micro_batch_loss(*masked_sum_and_count(item_losses(w, x), mask)) / 3).backward()
    totals, grad, state = saved.partial_window().clone(), w.grad.clone(), saved.state_dict()

    resumed = fresh(DeferredEngine, 3)
    resumed.load_state_dict(state)
    resumed.restore_window(totals)
    w = w0.clone().requires_grad_(True)
    w.grad = grad
    x, mask = window[2]
    resumed.start_micro_batch(2, window[2], upcoming=lambda n: [])
    (resumed.micro_batch_loss(*masked_sum_and_count(item_losses(w, x), mask)) / 3).backward()
    resumed.finish_window([w], ends_epoch=False, epoch_batches=3.0)
    torch.testing.assert_close(w.grad, expected_gradient(w0, window), rtol=1e-6, atol=1e-7)


def test_a_step_that_bypassed_finish_window_is_reported_once() -> None:
    engine = fresh(DeferredEngine, 1)
    assert engine.stepped_unfinished()
    w = torch.randn(FEATURES, requires_grad=True)
    run_window(engine, w, micro_batches([2]), k=1)
    assert not engine.stepped_unfinished()
    assert engine.stepped_unfinished()


# ---------------------------------------------------------------------------------------------- 2 ranks, real gloo

RANK_SIZES = [[6, 1, 3], [1, 4, 0]]  # rank 1's last micro-batch is empty: uneven shares of one window


def _rank_window(rank: int) -> list[MicroBatch]:
    return micro_batches(RANK_SIZES[rank], seed=10 + rank)


def _two_ranks(rank: int, port: int, engine_name: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        reduce_sum = _AllReduce(dist.ReduceOp.SUM)
        run = Run(3, 2, torch.device("cpu"), reduce_sum, _AllReduce(dist.ReduceOp.AVG), count_items=count_items)
        engine = {"deferred": DeferredEngine, "lookahead": LookaheadEngine}[engine_name]()
        engine.begin_fit(run)
        w = torch.ones(FEATURES).requires_grad_(True)
        window = _rank_window(rank)
        for offset, (x, mask) in enumerate(window):
            engine.start_micro_batch(offset, (x, mask), upcoming=lambda n, i=offset: window[i + 1 :][:n])
            (engine.micro_batch_loss(*masked_sum_and_count(item_losses(w, x), mask)) / 3).backward()
        dist.all_reduce(w.grad, op=dist.ReduceOp.AVG)  # what DDP does to the gradients
        engine.finish_window([w], ends_epoch=False, epoch_batches=3.0)
        if rank == 0:
            torch.save(w.grad, out)
    finally:
        dist.destroy_process_group()


class _AllReduce:
    def __init__(self, op: dist.ReduceOp) -> None:
        self.op = op

    def __call__(self, tensor: Tensor) -> Tensor:
        if self.op == dist.ReduceOp.AVG:  # gloo has no AVG: sum, then divide
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            return tensor / dist.get_world_size()
        dist.all_reduce(tensor, op=self.op)
        return tensor


@pytest.mark.slow
@pytest.mark.parametrize("engine_name", ["deferred", "lookahead"])
def test_two_ranks_over_gloo_give_the_global_item_mean(engine_name: str, tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grad.pt")
    mp.start_processes(_two_ranks, args=(port, engine_name, out), nprocs=2, start_method="spawn")
    expected = expected_gradient(torch.ones(FEATURES), _rank_window(0) + _rank_window(1))
    torch.testing.assert_close(torch.load(out), expected, rtol=1e-6, atol=1e-7)
