"""Resume under another split of the same effective batch: 2 ranks -> 1, 1 -> 2 and 1 -> 1 with another K and B.

A fit saves a checkpoint at an optimizer-step boundary (mid-epoch, or an epoch's end) and stops; a new Trainer on
another split resumes it. The final parameters must equal the plain-PyTorch run that never stopped (``elastic``).
A checkpoint inside a window, or of another effective batch, is refused with the fix.
"""

from __future__ import annotations

import pytest
from elastic import EPOCH_END, MID_EPOCH, ElasticModule, SaveAtStep, trainer, uninterrupted
from reference import flat_parameters, relative_distance
from test_sampler_resume import SAMPLES, dataset

from lightning_accum import GlobalBatchLoader, GlobalBatchSampler

# (ranks, K, B) before and after: E = 8 throughout.
TWO_TO_ONE = ((2, 2, 2), (1, 4, 2))
ONE_TO_TWO = ((1, 2, 4), (2, 1, 4))
ONE_TO_ONE = ((1, 2, 4), (1, 4, 2))


@pytest.fixture(scope="module")
def reference():
    return uninterrupted()


def stop_under(folder, before, mode="deferred", grouped=False, stop_step=MID_EPOCH, extra=0):
    """Fit on ``before`` until ``stop_step`` (+ ``extra`` micro-batches); the checkpoint it saved there."""
    ranks, k, b = before
    stop = SaveAtStep(folder / "split.ckpt", stop_step, extra)
    trainer(ranks, k, [stop], mode).fit(ElasticModule(k, b, grouped))
    return stop.path


def resume_from(checkpoint, after, mode="deferred", grouped=False):
    """Resume ``checkpoint`` on ``after`` with a new Trainer; final parameters."""
    ranks, k, b = after
    resumed = ElasticModule(k, b, grouped)
    trainer(ranks, k, [], mode).fit(resumed, ckpt_path=checkpoint)
    return flat_parameters(resumed.net)


def resume_under(tmp_path, before, after, mode="deferred", grouped=False, stop_step=MID_EPOCH, extra=0):
    """Fit on ``before`` until ``stop_step`` (+ ``extra`` micro-batches), resume on ``after``; final parameters."""
    return resume_from(stop_under(tmp_path, before, mode, grouped, stop_step, extra), after, mode, grouped)


SPLIT_IDS = {TWO_TO_ONE: "2ranks-to-1", ONE_TO_TWO: "1rank-to-2"}


def elastic_job(splits, mode="deferred", grouped=False, stop_step=MID_EPOCH) -> str:
    """The name in ``rank_jobs.JOBS`` of the two-rank half of ``resume_under(splits, ...)``: the fit that stops
    (2 ranks to 1) or the resumed fit (1 rank to 2, after the stop that ``rank_jobs.PREPARE`` fits here)."""
    at = "epoch_end" if stop_step == EPOCH_END else "mid_epoch"
    return f"elastic-{SPLIT_IDS[splits]}-{mode}-{'grouped' if grouped else 'ungrouped'}-{at}"


ELASTIC_RUNS = [
    *(
        (splits, mode, grouped, MID_EPOCH)
        for splits in SPLIT_IDS
        for mode in ("deferred", "lookahead")
        for grouped in (False, True)
    ),
    *((splits, "deferred", False, EPOCH_END) for splits in SPLIT_IDS),
]
"""The arguments (splits, mode, grouped, stop_step) of the resumes whose two-rank half runs in ``rank_runs``."""


def resumed_on_two_ranks_and_one(two_rank_runs, splits, mode="deferred", grouped=False, stop_step=MID_EPOCH):
    """Final parameters of ``resume_under(splits, ...)``, its two-rank half from ``rank_runs``' one launch."""
    job = elastic_job(splits, mode, grouped, stop_step)
    result = two_rank_runs[job]
    if splits == ONE_TO_TWO:
        return result["parameters"]
    return resume_from(two_rank_runs.folder_of(job) / "split.ckpt", splits[1], mode, grouped)


@pytest.mark.slow
@pytest.mark.two_ranks(*(elastic_job(*run) for run in ELASTIC_RUNS if run[3] == MID_EPOCH))
@pytest.mark.parametrize("grouped", [False, True], ids=["ungrouped", "grouped"])
@pytest.mark.parametrize("mode", ["deferred", "lookahead"])
@pytest.mark.parametrize("splits", [TWO_TO_ONE, ONE_TO_TWO], ids=["2ranks-to-1", "1rank-to-2"])
def test_resume_under_another_number_of_ranks(reference, measured, two_rank_runs, splits, mode, grouped) -> None:
    initial, final = reference
    parameters = resumed_on_two_ranks_and_one(two_rank_runs, splits, mode, grouped)
    assert measured(relative_distance(parameters, final, initial)) < 1e-5


@pytest.mark.slow
@pytest.mark.two_ranks(*(elastic_job(*run) for run in ELASTIC_RUNS if run[3] == EPOCH_END))
@pytest.mark.parametrize("splits", [TWO_TO_ONE, ONE_TO_TWO], ids=["2ranks-to-1", "1rank-to-2"])
def test_resume_at_an_epoch_end_under_another_number_of_ranks(reference, measured, two_rank_runs, splits) -> None:
    # Epoch 0 has 7 micro-batches per rank under 1 x 2 x 4, 4 under 2 x 1 x 4, 13 under 1 x 4 x 2, 7 under 2 x 2 x 2.
    initial, final = reference
    parameters = resumed_on_two_ranks_and_one(two_rank_runs, splits, stop_step=EPOCH_END)
    assert measured(relative_distance(parameters, final, initial)) < 1e-5


def test_checkpoint_inside_a_window_is_refused_under_another_split(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"different split 1 micro-batches into an optimizer step.*step boundary"):
        resume_under(tmp_path, *ONE_TO_ONE, extra=1)


def test_another_effective_batch_is_refused_naming_both(tmp_path) -> None:
    state = GlobalBatchLoader(dataset(), GlobalBatchSampler(SAMPLES, 4, 2, num_replicas=1, rank=0)).state_dict()
    other = GlobalBatchLoader(dataset(), GlobalBatchSampler(SAMPLES, 4, 4, num_replicas=1, rank=0))
    with pytest.raises(ValueError, match=r"saved effective batch is 8 samples per step, this sampler's is 16"):
        other.load_state_dict(state)


def test_loader_resumed_under_another_split_needs_the_rescaler() -> None:
    saved = GlobalBatchLoader(dataset(), GlobalBatchSampler(SAMPLES, 4, 2, num_replicas=1, rank=0))
    state = {**saved.state_dict(), "micro_batches": 4}  # after 2 optimizer steps of K=2
    resumed = GlobalBatchLoader(dataset(), GlobalBatchSampler(SAMPLES, 2, 4, num_replicas=1, rank=0))
    resumed.load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"counters still count the saved split.*Add SampleCountRescaler"):
        next(iter(resumed))
