"""Random labelled samples, some unlabelled (label -100), in a data module: GlobalBatchLoader."""

import lightning.pytorch as L
import torch
from torch.utils.data import TensorDataset

from lightning_accum import GlobalBatchLoader, GlobalBatchSampler

IGNORE = -100  # an unlabelled sample: its loss does not count


def make_dataset(num_samples: int, seed: int = 0) -> TensorDataset:
    """``num_samples`` seeded points with 8 features and 3 classes; about 30 % unlabelled."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, 8, generator=generator)
    y = torch.randint(0, 3, (num_samples,), generator=generator)
    y[torch.rand(num_samples, generator=generator) < 0.3] = IGNORE
    return TensorDataset(x, y)


class RandomDataModule(L.LightningDataModule):
    def __init__(self, num_samples: int = 96, batch_size: int = 8, shuffle: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data_train: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        self.data_train = make_dataset(self.hparams.num_samples)

    def train_dataloader(self) -> GlobalBatchLoader:
        # lightning-accum: the same windows of samples for any number of ranks (the process group is
        # up here, so the sampler reads the ranks from it); batch_size is each rank's micro-batch.
        sampler = GlobalBatchSampler(
            len(self.data_train),
            micro_batch_size=self.hparams.batch_size,
            accumulate_grad_batches=self.trainer.accumulate_grad_batches,
            shuffle=self.hparams.shuffle,
        )
        return GlobalBatchLoader(self.data_train, sampler)
