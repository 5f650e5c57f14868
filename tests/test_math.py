"""The pure counting and scaling functions, on numbers checked by hand."""

from __future__ import annotations

import pytest
import torch

from lightning_accum.counting import masked_sum_and_count
from lightning_accum.scaling import scale_gradients_, window_rescale_factor
from lightning_accum.totals import WindowTotals
from lightning_accum.window import ItemWindow


def test_masked_sum_and_count_by_hand() -> None:
    losses = torch.tensor([[0.5, 1.0, 2.0], [4.0, 8.0, 16.0]])
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]])
    loss_sum, items = masked_sum_and_count(losses, mask)
    assert loss_sum.item() == 0.5 + 2.0 + 16.0
    assert items.item() == 3


def test_masked_out_nan_and_inf_contribute_nothing_to_value_or_gradient() -> None:
    losses = torch.tensor([1.0, float("nan"), float("inf"), 3.0], requires_grad=True)
    loss_sum, items = masked_sum_and_count(losses, torch.tensor([True, False, False, True]))
    loss_sum.backward()
    assert (loss_sum.item(), items.item()) == (4.0, 2)
    assert losses.grad.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_half_precision_losses_are_summed_in_float32() -> None:
    losses = torch.full((40,), 60000.0, dtype=torch.float16)  # the fp16 sum would overflow to inf
    loss_sum, items = masked_sum_and_count(losses)
    assert loss_sum.dtype == torch.float32
    assert loss_sum.item() == 40 * 60000.0 and items.item() == 40


def test_all_false_mask_counts_zero_items() -> None:
    loss_sum, items = masked_sum_and_count(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert (loss_sum.item(), items.item()) == (0.0, 0.0)


def test_window_rescale_factor_by_hand() -> None:
    # K=3, R=2, u=5: the accumulated gradient is grad(S) / 30; 12 items were counted, so multiply by 30/12.
    factor = window_rescale_factor(3, 2, torch.tensor(5.0), torch.tensor(12.0))
    assert factor.item() == pytest.approx(2.5)


@pytest.mark.parametrize(("k", "r"), [(0, 1), (1, 0)])
def test_window_rescale_factor_rejects_non_positive_sizes(k: int, r: int) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        window_rescale_factor(k, r, torch.tensor(1.0), torch.tensor(1.0))


def test_scale_gradients_in_place_across_dtypes() -> None:
    g32 = torch.tensor([1.0, -2.0])
    g64 = torch.tensor([3.0], dtype=torch.float64)
    gbf16 = torch.tensor([4.0], dtype=torch.bfloat16)
    pointers = [g.data_ptr() for g in (g32, g64, gbf16)]
    scale_gradients_([g32, g64, gbf16], torch.tensor(0.25, dtype=torch.float64))
    assert g32.tolist() == [0.25, -0.5] and g64.tolist() == [0.75] and gbf16.tolist() == [1.0]
    assert [g.data_ptr() for g in (g32, g64, gbf16)] == pointers  # no copies


def micro_batch(loss_sum: float, items: float) -> torch.Tensor:
    zero = torch.zeros((), dtype=torch.float64)
    values = {name: zero for name in WindowTotals.names()}
    values |= {
        "loss_sum": torch.tensor(loss_sum, dtype=torch.float64),
        "items": torch.tensor(items, dtype=torch.float64),
    }
    return WindowTotals(**values).pack()


def test_item_window_sums_micro_batches_and_resets() -> None:
    window = ItemWindow()
    for loss_sum, items in [(2.0, 1.0), (5.0, 4.0), (0.0, 0.0)]:
        window.add(micro_batch(loss_sum, items))
    totals = WindowTotals.unpack(window.take(torch.device("cpu"), torch.float64))
    assert (totals.loss_sum.item(), totals.items.item(), totals.outputs.item()) == (7.0, 5.0, 0.0)
    window.add(micro_batch(1.0, 1.0))
    window.reset()  # gradients zeroed: the window's totals go with them
    assert window.take(torch.device("cpu"), torch.float64).tolist() == [0.0] * WindowTotals.size()
