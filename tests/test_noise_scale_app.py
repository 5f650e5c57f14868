"""accumulation=noise_scale in the Hydra app: K rises at an epoch's end and the next epoch's windows follow it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lightning_accum import GradientNoiseScale, NoiseScaleAccumulation

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from lightning_accum_app.app import build  # noqa: E402


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory):
    overrides = [
        f"paths.output_dir={tmp_path_factory.mktemp('noise_app')}",
        "accumulation=noise_scale",
        "data=regression",
        "data.sampler=global",
        "data.micro_batch_size=4",  # 8 samples per step at K=2: far below this data's noise scale
        "data.noise=1.0",
        "callbacks=minimal",
        "~logger",
        "trainer.max_epochs=2",
        "+trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "+trainer.enable_checkpointing=false",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    datamodule, model, trainer = build(cfg)
    trainer.fit(model, datamodule=datamodule)
    return trainer


def test_the_app_adds_the_noise_scale_pair_and_k_rises(fitted) -> None:
    follow = next(c for c in fitted.callbacks if isinstance(c, NoiseScaleAccumulation))
    assert sum(isinstance(c, GradientNoiseScale) for c in fitted.callbacks) == 1
    (epoch, k, scale), *_ = follow.history
    assert epoch == 0 and scale > 8 and k > 2, follow.history
    # The second epoch ran with the raised K (the rescaler checks at its first batch that the loader's windows
    # were cut for the Trainer's K); its end may raise K again for a next epoch.
    assert fitted.train_dataloader.batch_sampler.accumulate_grad_batches == k
    assert fitted.accumulate_grad_batches >= k
