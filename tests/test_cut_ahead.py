"""Grouped windows are cut one ahead on a worker thread: the same batches, in order, errors when due.

The batches themselves are checked against the layered dynamic programme elsewhere (``test_grouping.py``,
``test_grouping_search.py``); here the reference is the plain loop over the same items.
"""

from __future__ import annotations

import threading

import pytest

from lightning_accum import GlobalBatchSampler
from lightning_accum.data import sampler as sampler_module
from lightning_accum.data.cut_ahead import one_ahead


def test_one_ahead_gives_the_plain_loops_results_in_order() -> None:
    items = list(range(50))
    assert list(one_ahead(lambda item: (item * 7919) % 101, items)) == [(item * 7919) % 101 for item in items]
    assert list(one_ahead(lambda item: item, [])) == []


def test_the_next_item_is_worked_on_while_the_caller_holds_the_current() -> None:
    started = {index: threading.Event() for index in range(3)}

    def work(index: int) -> str:
        started[index].set()
        return threading.current_thread().name

    results = one_ahead(work, range(3))
    first = next(results)
    assert started[1].wait(timeout=30), "the second item was not worked on before the caller asked for it"
    assert not started[2].is_set()  # one ahead, no further
    assert first != threading.current_thread().name
    assert len(list(results)) == 2


def test_an_error_is_raised_when_its_result_is_due_and_closing_does_not_wait() -> None:
    release = threading.Event()

    def work(index: int) -> int:
        if index == 1:
            raise ValueError("no grouping fits")
        if index == 3:
            release.wait(timeout=30)
        return index

    results = one_ahead(work, range(4))
    assert next(results) == 0
    with pytest.raises(ValueError, match="no grouping fits"):
        next(results)
    results = one_ahead(work, [2, 3, 0])
    assert next(results) == 2  # item 3 is now blocked on the worker
    results.close()  # returns although the worker still holds item 3
    release.set()


def test_a_grouped_sampler_cuts_the_next_window_while_the_current_one_is_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cut_on: list[str] = []
    second_cut = threading.Event()
    original = sampler_module.grouped_micro_batches

    def recorded(*args, **kwargs):
        cut_on.append(threading.current_thread().name)
        if len(cut_on) == 2:
            second_cut.set()
        return original(*args, **kwargs)

    monkeypatch.setattr(sampler_module, "grouped_micro_batches", recorded)
    lengths = [(index * 37) % 23 + 1 for index in range(48)]
    batches = iter(GlobalBatchSampler(48, 2, 3, num_replicas=2, rank=1, seed=3, lengths=lengths, max_tokens=60))
    next(batches)
    assert second_cut.wait(timeout=30), "the second window was not cut ahead"
    assert threading.current_thread().name not in cut_on
    assert len(list(batches)) == 3 * 4 - 1
