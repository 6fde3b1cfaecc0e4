"""Runs a few SAGAN training iterations on the CPU with 1 or N processes (Lightning DDP, gloo), then every rank
writes its full model state to OUT/rank<r>.pt. (SyncBatchNorm needs GPUs, so --sync-bn only applies there.) Driven by tests/test_ddp.py; latents are a deterministic function
of (iteration, global sample index), so N x B and 1 x (N*B) see the same samples and the same noise.

    python tests/ddp_script.py --devices 2 --batch 8 --steps 8 --out DIR [--sync-bn] [--plain-noise] [--reuse-fakes]
"""

import argparse
import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sagan.checkpointing import AtomicCheckpointIO, Checkpoint  # noqa: E402
from sagan.data import SAGANData  # noqa: E402
from sagan.module import SAGAN  # noqa: E402
from sagan.strategy import GANDDPStrategy  # noqa: E402


class SharedNoiseSAGAN(SAGAN):
    """Latents for step s: one global draw of world*B vectors, rank r takes its slice."""

    def sample_latents(self, n):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        g = torch.Generator().manual_seed(1000 * self.d_steps + self.g_steps)
        z = torch.randn(world * n, self.z_dim, generator=g)[rank * n:(rank + 1) * n]
        y = torch.randint(0, self.num_classes, (world * n,), generator=g)[rank * n:(rank + 1) * n]
        return z.to(self.device), y.to(self.device)


class FrozenBNSharedNoiseSAGAN(SharedNoiseSAGAN):
    """G's BatchNorm layers normalise with their (fixed) running statistics: no coupling between the samples of a
    batch, so the split of a batch over processes cannot change the result."""

    def on_train_start(self):
        for m in self.generator.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()


class FailOnRank(pl.Callback):
    """An error on one rank only (a bad file, a full disk), in the middle of training."""

    def __init__(self, rank: int, iteration: int) -> None:
        self.rank, self.iteration = rank, iteration

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_rank == self.rank and pl_module.g_steps == self.iteration:
            raise RuntimeError(f"injected failure on rank {self.rank} at iteration {self.iteration}")


class DumpState(pl.Callback):
    def __init__(self, out: Path, record_indices: bool = False) -> None:
        self.out, self.record_indices = out, record_indices
        self.indices: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.record_indices:  # indexed prepared sets carry i in the first pixel's red and green values
            u = ((batch[0][:, :, 0, 0] + 1) * 127.5).round().long()
            self.indices += (u[:, 0] + 256 * u[:, 1]).tolist()

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"state": state, "g_steps": pl_module.g_steps, "indices": self.indices},
                   self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps")
    p.add_argument("--out", required=True)
    p.add_argument("--sync-bn", action="store_true")
    p.add_argument("--plain-noise", action="store_true", help="the module's own per-rank noise")
    p.add_argument("--reuse-fakes", action="store_true", help="model.reuse_fakes: the G step trains on the D step's images")
    p.add_argument("--freeze-bn", action="store_true", help="G's BatchNorm in eval mode (no batch coupling)")
    p.add_argument("--long", action="store_true", help="train (nearly) forever, for kill tests")
    p.add_argument("--prepared", help="train on this prepared set instead of the digits")
    p.add_argument("--fail-rank", type=int, help="this rank raises an error at iteration --fail-at")
    p.add_argument("--fail-at", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    if a.prepared:
        dm = SAGANData("prepared", root=a.prepared, resolution=32, batch_size=a.batch, num_workers=0)
    else:
        dm = SAGANData("digits", resolution=32, batch_size=a.batch)
    cls = SAGAN if a.plain_noise else FrozenBNSharedNoiseSAGAN if a.freeze_bn else SharedNoiseSAGAN
    model = cls(resolution=32, img_channels=dm.channels, num_classes=max(dm.num_classes, 10), z_dim=16, g_ch=8,
                d_ch=8, n_dis=1, conditional=dm.num_classes > 0, reuse_fakes=a.reuse_fakes)
    strategy = GANDDPStrategy(process_group_backend="gloo") if a.devices > 1 else "auto"
    callbacks = [DumpState(Path(a.out), record_indices=bool(a.prepared))]
    if a.fail_rank is not None:
        callbacks += [Checkpoint(dirpath=str(Path(a.out) / "checkpoints"), save_last=True, every_n_train_steps=2,
                                 save_on_exception=True), FailOnRank(a.fail_rank, a.fail_at)]
    trainer = pl.Trainer(
        accelerator="cpu", devices=a.devices, strategy=strategy, max_steps=10**9 if a.long else a.steps,
        sync_batchnorm=a.sync_bn and a.devices > 1, logger=False, enable_checkpointing=a.fail_rank is not None,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        default_root_dir=a.out, plugins=[AtomicCheckpointIO()] if a.fail_rank is not None else None,
    )
    trainer.fit(model, dm)
    if a.long:
        print("finished", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    main()
