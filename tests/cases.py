"""The test cases: micro-batches per rank, how they are accumulated, and their plain-PyTorch reference.

``CASES`` is the one case table and ``MATRIX`` the exactness matrix built from it (``test_exactness.py``): each
``Cell`` a case, a mode, a precision and a strategy, with what its fit must show against the reference.

Nothing here runs Lightning (``fits.py`` does) or imports lightning_accum: the expected numbers come from
``reference.py``, computed independently of the code under test.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from reference import (
    MicroBatch,
    ReferenceRun,
    flat_parameters,
    merge_ranks,
    relative_distance,
    split_into_windows,
    train_reference,
)
from torch import Tensor, nn

FEATURES, HIDDEN, CLASSES = 5, 8, 3


EXACT_TOLERANCE = 1e-5  # relative to the whole update, float32


NAIVE_MINIMUM = 0.1  # the naive run must be visibly wrong, so the comparison can fail


# Unit roundoff (half the machine epsilon) of each format.
UNIT_ROUNDOFF = {
    "32-true": 2.0**-24,
    "16-mixed": 2.0**-11,
    "bf16-mixed": 2.0**-8,
    "16-true": 2.0**-11,
    "bf16-true": 2.0**-8,
}


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))


def make_micro_batch(size: int, seed: int, tokens: int | None = None, keep: float | None = None) -> MicroBatch:
    """``size`` samples (of ``tokens`` tokens each if given); ``keep`` is the probability an item counts."""
    gen = torch.Generator().manual_seed(seed)
    shape = (size,) if tokens is None else (size, tokens)
    x = torch.randn(*shape, FEATURES, generator=gen)
    y = torch.randint(0, CLASSES, shape, generator=gen)
    mask = None if keep is None else torch.rand(shape, generator=gen) < keep
    return x, y, mask


def make_optimizer(name: str, lr: float):
    def build(module: nn.Module) -> torch.optim.Optimizer:
        if name == "sgd":
            return torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9)
        if name == "adamw":
            return torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.1)
        raise ValueError(name)

    return build


@dataclass
class Case:
    """Micro-batches per rank (the same every epoch) and how they are accumulated."""

    plan: list[list[MicroBatch]]
    accumulation: int | dict[int, int] = 1
    epochs: int = 2
    optimizer: str = "sgd"
    lr: float = 0.3
    clip_norm: float | None = None
    clip_value: float | None = None

    def k_at(self, epoch: int) -> int:
        if isinstance(self.accumulation, int):
            return self.accumulation
        return self.accumulation[max(e for e in self.accumulation if e <= epoch)]

    def reference_windows(self) -> list[list[MicroBatch]]:
        windows = []
        for epoch in range(self.epochs):
            k = self.k_at(epoch)
            windows += merge_ranks([split_into_windows(rank_plan, k) for rank_plan in self.plan])
        return windows


def count_case_items(batch) -> torch.Tensor:
    """The count rule of the test micro-batches ``(x, y, mask)``: the mask's ``True`` items, or all items."""
    _, y, mask = batch
    return torch.tensor(y.numel()) if mask is None else mask.bool().sum()


def varied_sizes_plan(tokens: int | None = None, keep: float | None = None) -> list[list]:
    sizes = [7, 1, 4, 2, 6, 1, 3]
    return [[make_micro_batch(n, seed=i, tokens=tokens, keep=keep) for i, n in enumerate(sizes)]]


def varied_case(epochs: int = 2) -> Case:
    plan = [[make_micro_batch(n, seed=i, tokens=3, keep=0.6) for i, n in enumerate([7, 1, 4, 2, 6, 1, 3])]]
    return Case(plan=plan, accumulation=3, epochs=epochs)


def last_batch_smaller_case(k: int) -> Case:
    """10 samples in batches of 3: micro-batches of 3, 3, 3, 1 every epoch."""
    x, y, _ = make_micro_batch(10, seed=1)
    plan = [[(x[i : i + 3], y[i : i + 3], None) for i in range(0, 10, 3)]]
    return Case(plan=plan, accumulation=k, epochs=4)


def uneven_ranks_case() -> Case:
    """Two ranks, K=2: micro-batch sizes differ between ranks and so do the per-rank window totals."""
    sizes = [[6, 1, 3, 5, 2, 7], [1, 4, 8, 1, 2, 1]]
    plan = [[make_micro_batch(n, seed=10 * r + i) for i, n in enumerate(s)] for r, s in enumerate(sizes)]
    return Case(plan=plan, accumulation=2, epochs=3)


def masked_ranks_case() -> Case:
    """Two ranks, per-token masks, K=3, AdamW, clipping; three windows per epoch.

    Window 1: rank 1's share is empty. Window 2: both ranks count tokens. Window 3: empty on both
    ranks, so no update at all.
    """
    keep0 = [0.6] * 6 + [0.0] * 3
    keep1 = [0.0] * 3 + [0.3] * 3 + [0.0] * 3
    sizes0, sizes1 = [3, 1, 4, 2, 5, 2, 1, 2, 3], [2, 2, 1, 3, 1, 4, 2, 1, 1]
    rank0 = [
        make_micro_batch(n, seed=100 + i, tokens=4, keep=p) for i, (n, p) in enumerate(zip(sizes0, keep0, strict=True))
    ]
    rank1 = [
        make_micro_batch(n, seed=200 + i, tokens=4, keep=p) for i, (n, p) in enumerate(zip(sizes1, keep1, strict=True))
    ]
    return Case(plan=[rank0, rank1], accumulation=3, epochs=3, optimizer="adamw", lr=0.05, clip_norm=0.5)


def masked_tokens_case(epochs: int = 3) -> Case:
    """One rank, per-token masks (one micro-batch counts nothing), K=3, clipping; three windows per epoch."""
    sizes = [7, 1, 4, 2, 6, 1, 3]
    plan = [make_micro_batch(n, seed=i, tokens=5, keep=0.5) for i, n in enumerate(sizes)]
    x, y, mask = plan[1]
    plan[1] = (x, y, torch.zeros_like(mask))
    return Case(plan=[plan], accumulation=3, epochs=epochs, clip_norm=0.5)


def empty_windows_case() -> Case:
    """Six micro-batches, K=2, AdamW: window 2 of each epoch counts no item (6 windows, 4 steps)."""
    sizes, keeps = [3, 2, 4, 1, 5, 2], [0.6, 0.6, 0.0, 0.0, 0.6, 0.6]
    plan = [make_micro_batch(n, seed=i, tokens=3, keep=p) for i, (n, p) in enumerate(zip(sizes, keeps, strict=True))]
    return Case(plan=[plan], accumulation=2, epochs=2, optimizer="adamw", lr=0.05)


def reference_run(case: Case) -> ReferenceRun:
    return train_reference(
        make_net(), case.reference_windows(), make_optimizer(case.optimizer, case.lr), case.clip_norm, case.clip_value
    )


def reference_distance(
    case: Case, net: nn.Module, skip_windows: tuple[int, ...] = (), windows: list[list[MicroBatch]] | None = None
) -> float:
    """Relative distance of ``net`` to the float32 reference over ``windows`` (default: the case's windows);
    windows in ``skip_windows`` make no step."""
    return flat_reference_distance(case, flat_parameters(net), skip_windows, windows)


def flat_reference_distance(
    case: Case, parameters: Tensor, skip_windows: tuple[int, ...] = (), windows: list[list[MicroBatch]] | None = None
) -> float:
    """``reference_distance`` of flat final parameters (as gathered from sharded or remote ranks)."""
    windows = case.reference_windows() if windows is None else windows
    windows = [[] if i in skip_windows else w for i, w in enumerate(windows)]
    reference = train_reference(
        make_net(), windows, make_optimizer(case.optimizer, case.lr), case.clip_norm, case.clip_value
    ).parameters
    return relative_distance(parameters.float().cpu(), reference, flat_parameters(make_net()))


def masked_out(batch: MicroBatch) -> MicroBatch:
    """``batch`` with no counted item: how the reference sees a micro-batch that no backward carried."""
    x, y, _ = batch
    return x, y, torch.zeros_like(y, dtype=torch.bool)


def tolerance(precision: str, case: Case, reference: Tensor | None = None) -> float:
    """Allowed relative distance to the float32 reference: a rounding budget from the unit roundoff ``u``.

    A budget, not a proven bound (rounding also grows with reduction lengths and compounds through the
    optimizer's state); measured errors sit 3.5 to 5 times inside it. Mixed precision keeps float32
    parameters and optimizer state; only the products of the forward and backward take operands rounded to
    the format (two operands, forward and backward): a relative ``4u`` per step's gradient, and so per update. True half
    precision also stores the parameters in the format: the initial values and each of the ``S`` updates
    are rounded by ``u |theta|``; as independent roundings they add up like a random walk, so the extra
    relative error is ``2 sqrt(S + 1) u |theta| / |theta - theta_0|`` (factor 2 as margin). float32: 1e-5.
    """
    if precision in ("32-true", "64-true"):  # the float32 reference's own rounding bounds the distance
        return 1e-5
    u = UNIT_ROUNDOFF[precision]
    if precision.endswith("mixed"):
        return 4 * u
    windows = case.reference_windows()
    if reference is None:
        reference = train_reference(
            make_net(), windows, make_optimizer(case.optimizer, case.lr), case.clip_norm, case.clip_value
        ).parameters
    ratio = float(reference.norm() / (reference - flat_parameters(make_net())).norm())
    return 4 * u + 2 * (len(windows) + 1) ** 0.5 * u * ratio


def epoch_means(run: ReferenceRun, windows_per_epoch: int) -> list[float]:
    means = []
    for start in range(0, len(run.step_items), windows_per_epoch):
        items = run.step_items[start : start + windows_per_epoch]
        losses = run.step_losses[start : start + windows_per_epoch]
        means.append(sum(loss * n for loss, n in zip(losses, items, strict=True) if n) / sum(items))
    return means


def assert_logs_match(rows: list[dict[str, str]], run: ReferenceRun, windows_per_epoch: int) -> None:
    step_rows = [r for r in rows if r["train/items"]]
    assert [int(float(r["train/items"])) for r in step_rows] == run.step_items
    for row, expected in zip(step_rows, run.step_losses, strict=True):
        if math.isnan(expected):
            assert math.isnan(float(row["train/loss"]))  # an empty window's mean is undefined
        else:
            assert float(row["train/loss"]) == pytest.approx(expected, rel=1e-6)
    epoch_rows = [float(r["train/loss_epoch"]) for r in rows if r["train/loss_epoch"]]
    assert epoch_rows == pytest.approx(epoch_means(run, windows_per_epoch), rel=1e-6)


def step_sets(per_rank: list[list[list[int]]], k: int) -> list[list[int]]:
    """Sorted real sample indices of each optimizer step: K consecutive micro-batches on every rank."""
    n_micro = len(per_rank[0])
    return [
        sorted(i for batches in per_rank for batch in batches[s : s + k] for i in batch if i != -1)
        for s in range(0, n_micro, k)
    ]


def expected_steps(n: int, e: int, seed: int, epoch: int, drop_last: bool = False) -> list[list[int]]:
    """Independent expectation: the seeded permutation of the whole dataset cut into windows of E."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    stop = n - n % e if drop_last else n
    return [sorted(order[s : min(s + e, stop)]) for s in range(0, stop, e)]


def uneven_case(sizes: tuple[int, int], k: int) -> Case:
    """Two ranks with different numbers of micro-batches (of 2 to 4 samples), K=k, two epochs."""
    plan = [[make_micro_batch(2 + i % 3, seed=10 * r + i) for i in range(n)] for r, n in enumerate(sizes)]
    return Case(plan=plan, accumulation=k, epochs=2)


def partial_window_ranks_case() -> Case:
    """Two ranks of 5 micro-batches (2 to 4 samples), K=3: each epoch ends with a window of 2 micro-batches."""
    return uneven_case((5, 5), 3)


def clipped_ranks_case() -> Case:
    """``masked_ranks_case`` clipped at a norm of 0.37, between the reference's step gradient norms (0.35 to
    0.54): some steps clip and others do not, so clipping a gradient of the wrong scale shows."""
    case = masked_ranks_case()
    case.clip_norm = 0.37
    return case


def masked_ranks_sgd_case() -> Case:
    """``masked_ranks_case`` with SGD: float16 parameters cannot take AdamW (its eps=1e-8 rounds to 0 in float16,
    so Adam gives nan with or without the rescaler)."""
    case = masked_ranks_case()
    case.optimizer, case.lr = "sgd", 0.3
    return case


def with_float_masks(plan: list[list[MicroBatch]]) -> list[list[MicroBatch]]:
    return [[(x, y, m.float()) for x, y, m in rank_plan] for rank_plan in plan]


def all_false_micro_batch(plan: list[list[MicroBatch]], index: int = 1) -> list[list[MicroBatch]]:
    """``plan`` where micro-batch ``index`` of rank 0 counts no item."""
    x, y, mask = plan[0][index]
    plan[0][index] = (x, y, torch.zeros_like(mask))
    return plan


def clipped(case: Case, clip_norm: float | None, clip_value: float | None) -> Case:
    case.clip_norm, case.clip_value = clip_norm, clip_value
    return case


def float_mask_case(optimizer: str) -> Case:
    """0/1 float token masks, K=4, two epochs."""
    plan = with_float_masks(varied_sizes_plan(tokens=3, keep=0.7))
    return Case(plan=plan, accumulation=4, epochs=2, optimizer=optimizer, lr=0.05)


SCHEDULE = {0: 2, 1: 3, 2: 1, 3: 4}  # K changes between epochs (a GradientAccumulationScheduler)


# The one case table: name -> a fresh Case (tests may change their copy). Ranks are len(case.plan).
CASES: dict[str, Callable[[], Case]] = {
    **{f"last_batch_k{k}": functools.partial(last_batch_smaller_case, k) for k in range(1, 9)},
    "schedule": lambda: Case(plan=varied_sizes_plan(), accumulation=dict(SCHEDULE), epochs=4),
    "schedule_masked": lambda: Case(plan=varied_sizes_plan(tokens=3, keep=0.6), accumulation=dict(SCHEDULE), epochs=4),
    "token_masks": lambda: Case(
        plan=all_false_micro_batch(varied_sizes_plan(tokens=5, keep=0.5)),
        accumulation=3,
        epochs=3,
        optimizer="adamw",
        lr=0.05,
    ),
    "clip_norm": lambda: Case(plan=varied_sizes_plan(), accumulation=3, epochs=3, clip_norm=0.3),
    "clip_value": lambda: Case(plan=varied_sizes_plan(), accumulation=3, epochs=3, clip_value=0.05),
    **{f"float_mask_{optimizer}": functools.partial(float_mask_case, optimizer) for optimizer in ("sgd", "adamw")},
    "masked_tokens": masked_tokens_case,
    "masked_tokens_clip_norm": lambda: clipped(masked_tokens_case(), 0.3, None),
    "masked_tokens_clip_value": lambda: clipped(masked_tokens_case(), None, 0.05),
    "uneven_ranks": uneven_ranks_case,
    "masked_ranks": masked_ranks_case,
    "masked_ranks_sgd": masked_ranks_sgd_case,
}


# The exactness matrix: which fits are compared with the plain-PyTorch reference, and what they must show.
MODES = ("deferred", "lookahead", "manual", "naive", "naive-manual")
"""``deferred`` and ``lookahead``: the rescaler's two modes under automatic optimization; ``manual``: the module's
own loop with ``sample_backward``; ``naive`` (automatic) and ``naive-manual`` (its own loop): no rescaler, each
micro-batch's item mean, which the matrix shows is off the reference wherever micro-batches are uneven."""

STRATEGIES = ("single", "ddp", "spawn")
"""``single``: one process; ``ddp``: two ranks that Lightning's ``strategy="ddp"`` launches (a script it
re-runs for rank 1); ``spawn``: two ranks started by ``torch.multiprocessing``'s spawn (the start method of
``strategy="ddp_spawn"``, its arguments pickled), each running ``DDPStrategy``. One launch serves every cell of
a strategy (``shared_fits.py``)."""


@dataclass(frozen=True)
class Cell:
    """One fit of the matrix: a case of ``CASES`` in a mode, a precision and a strategy."""

    case: str
    mode: str
    precision: str = "32-true"
    strategy: str = "single"

    @property
    def id(self) -> str:
        return f"{self.strategy}-{self.mode}-{self.precision}-{self.case}"

    @property
    def naive(self) -> bool:
        return self.mode.startswith("naive")

    @property
    def differs(self) -> bool:
        """Whether the fit must be off the reference: a naive fit, unless every step is one micro-batch in one
        process (K=1), where a micro-batch's mean already is the step's item mean."""
        return self.naive and not (self.case == "last_batch_k1" and self.strategy == "single")

    @property
    def figures(self) -> tuple[str, ...]:
        """The keys of ``docs/figures/measured.json`` that the docs quote for this fit (the tests that measured
        it before the matrix); empty for a fit they do not quote."""
        return FIGURE_KEYS.get(self.id, ())


def far_bound(precision: str, case: Case, reference: Tensor | None = None) -> float:
    """How far a naive fit must at least be: beyond ``NAIVE_MINIMUM`` and ten times the format's tolerance."""
    return max(NAIVE_MINIMUM, 10 * tolerance(precision, case, reference))


@functools.cache
def case_reference(name: str) -> Tensor:
    """The final parameters of the reference run of ``CASES[name]``, computed once per session."""
    return reference_run(CASES[name]()).parameters


SINGLE_CASES = (
    *(f"last_batch_k{k}" for k in range(1, 9)),
    "schedule",
    "schedule_masked",
    "token_masks",
    "clip_norm",
    "clip_value",
    "float_mask_sgd",
    "float_mask_adamw",
    "masked_tokens",
    "masked_tokens_clip_norm",
    "masked_tokens_clip_value",
)
LOW_PRECISIONS = ("16-mixed", "bf16-mixed", "16-true", "bf16-true")
RANKS_CASES = ("uneven_ranks", "masked_ranks")


def ranks_case(precision: str) -> str:
    """The two-rank case of the low-precision cells (uneven ranks, a rank with an empty share, an empty window,
    clipping): with AdamW, or SGD in float16 parameters (``masked_ranks_sgd_case``)."""
    return "masked_ranks_sgd" if precision == "16-true" else "masked_ranks"


MATRIX: list[Cell] = [
    # One process, float32: every case in every mode and its naive control.
    *(Cell(case, mode) for case in SINGLE_CASES for mode in MODES),
    # One process, every other precision on masked_tokens (K=3, token masks, an all-masked micro-batch, a short
    # last window, clipping).
    *(Cell("masked_tokens", mode, precision) for precision in ("64-true", *LOW_PRECISIONS) for mode in MODES),
    # Two ranks, both launchers: float32 on both two-rank cases, every other precision on masked_ranks.
    *(
        Cell(case, mode, "32-true", strategy)
        for strategy in ("ddp", "spawn")
        for case in RANKS_CASES
        for mode in ("deferred", "lookahead", "manual", "naive")
    ),
    *(
        Cell(ranks_case(precision), mode, precision, strategy)
        for strategy in ("ddp", "spawn")
        for precision in LOW_PRECISIONS
        for mode in ("deferred", "lookahead", "manual", "naive")
    ),
]


def _figure_keys() -> dict[str, tuple[str, ...]]:
    """Cell id -> the figure keys it measures, named after the tests that measured them before the matrix."""
    exactness, precision, manual = "tests/test_exactness.py::", "tests/test_precision.py::", "tests/test_manual.py::"
    single = {
        **{f"last_batch_k{k}": f"test_last_batch_smaller_any_k[{k}]" for k in range(1, 9)},
        "schedule": "test_accumulation_schedule_changes_k_between_epochs",
        "token_masks": "test_token_masks_with_an_all_false_micro_batch",
        "clip_norm": "test_gradient_clipping_acts_on_the_exact_gradient[norm]",
        "clip_value": "test_gradient_clipping_acts_on_the_exact_gradient[value]",
    }
    keys: dict[str, list[str]] = {}

    def add(cell: Cell, key: str) -> None:
        keys.setdefault(cell.id, []).append(key)

    for case, test in single.items():
        add(Cell(case, "deferred"), f"{exactness}{test} exact")
        add(Cell(case, "naive"), f"{exactness}{test} naive")
    for optimizer in ("sgd", "adamw"):
        add(
            Cell(f"float_mask_{optimizer}", "deferred"),
            f"{exactness}test_float_mask_of_zeros_and_ones[{optimizer}] exact",
        )
    for name in ("64-true", "32-true", *LOW_PRECISIONS):
        for mode in ("deferred", "lookahead"):
            add(
                Cell("masked_tokens", mode, name),
                f"{precision}test_matches_the_float32_reference_within_rounding[{name}-{mode}]",
            )
    for name in LOW_PRECISIONS:
        add(Cell("masked_tokens", "naive", name), f"{precision}test_naive_is_far_outside_the_tolerance[{name}] naive")
    for name in ("32-true", *LOW_PRECISIONS):
        add(Cell("masked_tokens", "manual", name), f"{manual}test_own_loop_with_clipping_matches_the_reference[{name}]")
    for strategy, test in (("spawn", "test_ddp_spawn_two_ranks"), ("ddp", "test_ddp_popen_two_ranks")):
        for case in RANKS_CASES:
            add(Cell(case, "deferred", "32-true", strategy), f"{exactness}{test}[{case}_case] exact")
            add(Cell(case, "naive", "32-true", strategy), f"{exactness}{test}[{case}_case] naive")
    for name in ("32-true", *LOW_PRECISIONS):
        for mode in ("deferred", "lookahead", "manual"):
            add(Cell(ranks_case(name), mode, name, "spawn"), f"{precision}test_ddp_spawn_two_ranks[{name}-{mode}]")
    return {cell_id: tuple(found) for cell_id, found in keys.items()}


FIGURE_KEYS = _figure_keys()
