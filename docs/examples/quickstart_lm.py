"""Quick start, token LM: one loss per token, padding masked out, exact means over each step."""

from functools import partial

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader

from lightning_accum import SampleCountMixin, SampleCountRescaler

PAD = -100


class TinyLM(SampleCountMixin, L.LightningModule):
    def __init__(self, vocab: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 16)
        self.head = torch.nn.Linear(16, vocab)

    def training_step(self, batch, batch_idx):
        inputs, target = batch[:, :-1].clamp(min=0), batch[:, 1:]  # next-token prediction
        logits = self.head(self.embed(inputs))  # (batch, length, vocab)
        losses = F.cross_entropy(logits.transpose(1, 2), target, reduction="none", ignore_index=PAD)
        return self.sample_loss(losses, mask=target != PAD)  # the mean over the real tokens

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


torch.manual_seed(0)
sequences = [torch.randint(0, 32, (int(n),)) for n in torch.randint(2, 40, (64,))]  # 2 to 39 tokens
pad = partial(pad_sequence, batch_first=True, padding_value=PAD)
loader = DataLoader(sequences, batch_size=8, collate_fn=pad)  # 8 micro-batches: 2 steps of 4
# A step weighs every real token of its 4 micro-batches equally; train/items logs its token count.
trainer = L.Trainer(
    max_epochs=2,
    accumulate_grad_batches=4,
    callbacks=[SampleCountRescaler()],
    logger=False,
    enable_checkpointing=False,  # writes nothing to the working folder
)
trainer.fit(TinyLM(), loader)
print({name: round(value.item(), 4) for name, value in trainer.callback_metrics.items()})
# The last step: the predicted tokens (all but each sequence's first) of the last 32 sequences.
assert trainer.callback_metrics["train/items"] == sum(len(s) - 1 for s in sequences[32:])
