"""Short in-process runs of the Hydra app: each data x model pair, an accumulation schedule, the rescaler modes."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from app_runs import initial_model
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from reference import relative_distance

from lightning_accum_app.app import run_training
from lightning_accum_app.invariance import flat_parameters

CONF = Path(__file__).resolve().parents[1] / "conf"
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def compose_train(tmp_path: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={tmp_path}", *QUIET, *overrides])


def read_history(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def train_items(cfg: DictConfig) -> int:
    """Items of one epoch, counted from the raw data: samples, or next-token targets of each sequence."""
    dm = instantiate(cfg.data)
    dm.setup()
    if "tokens" in dm.train_set[0]:
        return sum(len(s["tokens"]) - 1 for s in dm.train_set)
    return len(dm.train_set)


@pytest.mark.slow
@pytest.mark.parametrize(("data", "model"), [("regression", "mlp"), ("digits", "mlp"), ("tokens", "causal_lm")])
def test_each_data_model_pair_trains_and_counts_every_item_once(tmp_path, data, model):
    cfg = compose_train(tmp_path, f"data={data}", f"model={model}", "trainer.max_epochs=1", "accumulation.k=3")
    metrics = run_training(cfg)
    history = read_history(tmp_path / "history.csv")
    batches = len(instantiate(cfg.data).train_dataloader())
    assert len(history) == math.ceil(batches / 3)
    assert history[-1]["items_seen"] == train_items(cfg)
    assert history[-1]["loss"] < history[0]["loss"]
    assert math.isfinite(metrics["val/loss"])
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"] == metrics
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "csv" / "metrics.csv").exists()


@pytest.mark.slow
def test_invalid_pair_names_both_configs(tmp_path):
    cfg = compose_train(tmp_path, "data=tokens", "model=mlp")
    with pytest.raises(TypeError, match="does not fit data"):
        run_training(cfg)


@pytest.mark.slow
def test_schedule_changes_the_window_of_the_global_sampler_each_epoch(tmp_path):
    # 997 samples, micro-batch 32, K = 1, 2, 4 in epochs 0, 1, 2: windows of 32, 64 and 128 samples.
    cfg = compose_train(
        tmp_path,
        "data=regression",
        "data.sampler=global",
        "accumulation=schedule",
        "trainer.max_epochs=3",
        "callbacks=default",
    )
    run_training(cfg)
    items = [row["items_seen"] for row in read_history(tmp_path / "history.csv")]
    per_step = [b - a for a, b in zip([0.0, *items[:-1]], items, strict=True)]
    expected = []
    for window in (32, 64, 128):
        full, rest = divmod(997, window)
        expected += [window] * full + [rest]
    assert per_step == expected


def snapshot(cfg: DictConfig) -> dict[str, torch.Tensor]:
    """Initial and final flat parameters of a run of ``cfg`` (``callbacks=invariance`` writes them)."""
    run_training(cfg)
    return torch.load(Path(cfg.paths.output_dir) / "parameters.pt")


@pytest.mark.slow
def test_model_rebuilt_from_the_config_is_the_model_a_run_starts_from(tmp_path):
    # The app tests measure distances as a fraction of the update from this rebuilt model.
    cfg = compose_train(tmp_path, "experiment=digits_global", "debug=fast", "callbacks=invariance")
    parameters = snapshot(cfg)
    assert torch.equal(flat_parameters(initial_model(cfg)), parameters["initial"])
    assert not torch.equal(parameters["final"], parameters["initial"])


@pytest.mark.slow
def test_lookahead_mode_trains_the_same_model_as_deferred_mode(tmp_path, measured):
    # Padded token sequences, K=3 over 8 micro-batches (windows of 3, 3, 2); the model counts the masked tokens.
    common = ["data=tokens", "model=causal_lm", "debug=fast", "accumulation.k=3", "callbacks=invariance"]
    final = {}
    for mode in ("deferred", "lookahead"):
        cfg = compose_train(tmp_path / mode, *common, f"callbacks.sample_count_rescaler.mode={mode}")
        final[mode] = snapshot(cfg)["final"]
    initial = flat_parameters(initial_model(cfg))
    assert measured(relative_distance(final["lookahead"], final["deferred"], initial)) < 1e-5


@pytest.mark.slow
def test_run_resumed_from_a_checkpoint_continues_the_items_seen_history(tmp_path):
    common = ["data=regression", "data.sampler=global", "accumulation.k=3", "callbacks=default"]
    cfg = compose_train(tmp_path / "whole", *common, "trainer.max_epochs=2")
    run_training(cfg)
    run_training(compose_train(tmp_path / "first", *common, "trainer.max_epochs=1"))
    resumed = [f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=2"]
    run_training(compose_train(tmp_path / "resumed", *common, *resumed))
    whole = read_history(tmp_path / "whole" / "history.csv")
    history = read_history(tmp_path / "resumed" / "history.csv")
    assert [row["items_seen"] for row in history] == [row["items_seen"] for row in whole]
    assert history[-1]["items_seen"] == 2 * train_items(cfg)
    assert [row["loss"] for row in history] == pytest.approx([row["loss"] for row in whole], rel=1e-5)
