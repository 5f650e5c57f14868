"""`scripts/train.py hparams_search=...` in a subprocess: an Optuna study through Hydra's Optuna sweeper."""

from __future__ import annotations

import json
import sys

import optuna
import pytest
from app_runs import QUIET, TRAIN, read_rows, run
from omegaconf import OmegaConf


@pytest.mark.slow
@pytest.mark.parametrize(
    ("search", "metric", "best"), [("digits_optuna", "val/acc", max), ("lm_optuna", "val/loss", min)]
)
def test_search_runs_its_trials_and_reports_the_best_of_them(tmp_path, search, metric, best):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = [f"hparams_search={search}", "hydra.sweeper.n_trials=3", "debug=fast", f"paths.log_dir={tmp_path}", *QUIET]
    out = run(
        [sys.executable, TRAIN, *args, f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=s"], tmp_path
    )
    (results_path,) = tmp_path.rglob("optimization_results.yaml")
    sweep = results_path.parent
    jobs = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in range(3)]
    assert sorted(p.parent.name for p in sweep.glob("*/metrics.json")) == ["0", "1", "2"]
    values = [job["metrics"][metric] for job in jobs]

    results = OmegaConf.to_container(OmegaConf.load(results_path))
    assert results["best_value"] == best(values)
    best_overrides = {f"{name}={value}" for name, value in results["best_params"].items()}
    assert best_overrides <= set(jobs[values.index(best(values))]["overrides"])

    # Optuna's own record of the study: trial i is job folder i, with its parameters and returned metric.
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert [t.value for t in trials] == values
    for trial, job in zip(trials, jobs, strict=True):
        assert set(trial.params) == {"model.optimizer.lr", "accumulation.k", "data.micro_batch_size"}
        assert {f"{name}={value}" for name, value in trial.params.items()} <= set(job["overrides"])

    # The summary shows each trial's global batch: K x micro-batch items in the first optimizer step.
    rows = read_rows(sweep / "summary.csv")
    assert len(rows) == 3 and "Sweep summary of 3 runs" in out
    if search == "digits_optuna":  # one item per sample
        for row, trial in zip(rows, trials, strict=True):
            assert (
                int(row["first_step_items"]) == trial.params["accumulation.k"] * trial.params["data.micro_batch_size"]
            )
