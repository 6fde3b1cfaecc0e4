"""Lightning's DDP, wrapped the way a GAN needs it: one ``DistributedDataParallel`` per network.

Plain ``DDPStrategy`` wraps the whole LightningModule in one DDP. A discriminator step never touches G's
parameters and a generator step must not update D's, so one wrapper needs ``find_unused_parameters=True``: an
autograd-graph search on every backward, and all-reduce buckets that span both networks. Here Lightning's engine
stays as it is (launchers, process groups, samplers, SyncBatchNorm, checkpointing, precision) and only the wrapping
changes: G and D get their own DDP, each used only in the step that trains it, so every backward uses all
parameters of exactly one wrapper and ``find_unused_parameters`` stays off. The EMA generator is never wrapped:
it is updated from G's synchronised weights, identically on every rank.

Buffers (spectral-norm power-iteration vectors, BatchNorm statistics) are broadcast from rank 0 at each wrapped
forward (DDP's ``broadcast_buffers``); ``trainer.sync_batchnorm: true`` makes G's batch statistics global.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pytorch_lightning.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel


class GANDDPStrategy(DDPStrategy):
    """``DDPStrategy`` that wraps the module's ``generator`` and ``discriminator`` separately.

    The LightningModule must define ``set_ddp_wrappers(generator_ddp, discriminator_ddp)`` and use the wrappers
    for the network it trains in each step (``sagan.module.SAGAN`` does).
    """

    strategy_name = "gan_ddp"

    def __init__(self, *args: Any, timeout: timedelta | None = timedelta(minutes=30), **kwargs: Any) -> None:
        kwargs.setdefault("find_unused_parameters", False)
        super().__init__(*args, timeout=timeout, **kwargs)

    def configure_ddp(self) -> None:
        module = self.model
        if not hasattr(module, "set_ddp_wrappers"):
            raise TypeError(f"{type(self).__name__} needs a LightningModule with set_ddp_wrappers(); use DDPStrategy")
        device_ids = self.determine_ddp_device_ids()
        module.set_ddp_wrappers(
            DistributedDataParallel(module.generator, device_ids=device_ids, **self._ddp_kwargs),
            DistributedDataParallel(module.discriminator, device_ids=device_ids, **self._ddp_kwargs),
        )
        # self.model stays the LightningModule itself: no reducer spans both networks

    def teardown(self) -> None:
        module = self.lightning_module
        if module is not None and hasattr(module, "set_ddp_wrappers"):
            module.set_ddp_wrappers(None, None)
        super().teardown()
