"""EpochTimer records one wall and one CPU duration per training epoch."""

import lightning.pytorch as pl
import torch

from cellsight.train import EpochTimer


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def training_step(self, batch, batch_idx):
        return ((batch[0] - self.w) ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_epoch_timer_records_every_epoch():
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(8, 3)),
                                       batch_size=4)
    timer = EpochTimer()
    pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False,
               callbacks=[timer]).fit(_Tiny(), data)
    assert len(timer.wall) == len(timer.cpu) == 3
    assert all(t > 0 for t in timer.wall) and all(c >= 0 for c in timer.cpu)
