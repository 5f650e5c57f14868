"""Train from the composed config: the entry point of a lightning-hydra-template-style project.

    python train.py                                  # 1 process, K from trainer/default.yaml (1)
    python train.py +trainer.accumulate_grad_batches=4
    python train.py -m +split=one_process,two_ranks  # the same 32 samples per step, split two ways

Each run saves its initial and final parameters to ``parameters.pt`` in its output folder.
"""

from pathlib import Path

import hydra
import lightning.pytorch as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="train.yaml")
def main(cfg: DictConfig) -> None:
    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    initial = [p.detach().clone() for p in model.parameters()]
    trainer.fit(model, datamodule=datamodule)
    final = [p.detach().clone() for p in model.parameters()]  # ddp_spawn: rank 0's weights
    out = Path(HydraConfig.get().runtime.output_dir)
    torch.save({"initial": initial, "final": final}, out / "parameters.pt")
    print({name: round(float(value), 4) for name, value in trainer.callback_metrics.items()})


if __name__ == "__main__":
    main()
