"""Cut the next window while the current one trains: a one-item-ahead producer on a worker thread.

A grouped window (``grouping.length_groups``) costs milliseconds to tens of milliseconds of Python, and every
rank cuts every window in its training process. The sampler is consumed in order, so the next window can be
cut while the caller still uses the current one: during a training step the main thread mostly waits on the
device or on C++ kernels, which release the GIL. The results, and the order they come in, are those of the
plain loop; only when the work runs changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def one_ahead(work: Callable[[Item], Result], items: Iterable[Item]) -> Iterator[Result]:
    """Yield ``work(item)`` for each item in order, working on the next item on a thread while the caller
    uses the current result.

    ``items`` is read on the caller's thread, one item ahead of the results; ``work`` runs on one worker
    thread, one call at a time. An exception raised by ``work`` is raised here when its result is due.
    Closing the iterator early drops the pending call's result without waiting for it.

    Examples:
        >>> list(one_ahead(lambda x: x * x, range(4)))
        [0, 1, 4, 9]
        >>> results = one_ahead(lambda x: 10 // x, [5, 0])
        >>> next(results)
        2
        >>> next(results)
        Traceback (most recent call last):
        ...
        ZeroDivisionError: integer division or modulo by zero
    """
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning-accum-cut-ahead")
    pending: Future[Result] | None = None
    try:
        for item in items:
            following = worker.submit(work, item)
            if pending is not None:
                yield pending.result()
            pending = following
        if pending is not None:
            yield pending.result()
    finally:
        worker.shutdown(wait=False, cancel_futures=True)
