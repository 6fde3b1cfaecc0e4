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

import torch
from pytorch_lightning.strategies import DDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class TrainingNetworks:
    """How the training steps call G and D: through their own DDP wrappers under :class:`GANDDPStrategy`, and
    compiled with ``torch.compile`` when asked. D in G's step is the plain (or compiled) D, never its wrapper: its parameters are
    frozen there and its gradients must not be all-reduced. A plain object, not an ``nn.Module``, so wrappers and
    compiled graphs never enter the state dict.
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module, compile: bool | str = False) -> None:
        self.generator, self.discriminator, self.compile = generator, discriminator, compile
        self._ddp: dict[str, nn.Module] = {}
        self._compiled: dict[str, tuple[nn.Module, nn.Module]] = {}

    def set_ddp(self, generator: nn.Module | None, discriminator: nn.Module | None) -> None:
        """The DDP wrappers to train G and D through (None: the plain modules)."""
        self._ddp = {"g": generator, "d": discriminator} if generator is not None else {}

    @property
    def g(self) -> nn.Module:
        """G for its own step."""
        return self._fast("g", self._ddp.get("g") or self.generator)

    @property
    def d(self) -> nn.Module:
        """D for its own step."""
        return self._fast("d", self._ddp.get("d") or self.discriminator)

    @property
    def d_frozen(self) -> nn.Module:
        """D as used in G's step."""
        return self._fast("d_frozen", self.discriminator)

    def _fast(self, key: str, module: nn.Module) -> nn.Module:
        if not self.compile:
            return module
        if key not in self._compiled or self._compiled[key][0] is not module:
            mode = self.compile if isinstance(self.compile, str) else None  # e.g. 'reduce-overhead' (CUDA graphs)
            self._compiled[key] = (module, torch.compile(module, mode=mode))
        return self._compiled[key][1]


class GANDDPStrategy(DDPStrategy):
    """``DDPStrategy`` that wraps the module's ``generator`` and ``discriminator`` separately.

    The LightningModule must hold its networks as ``nets``, a :class:`TrainingNetworks`, and train through it
    (``sagan.module.SAGAN`` does). ``--trainer.strategy ddp`` selects this strategy in the ``sagan`` command.
    """

    strategy_name = "gan_ddp"

    def __init__(self, *args: Any, timeout: timedelta | None = timedelta(minutes=30), **kwargs: Any) -> None:
        kwargs.setdefault("find_unused_parameters", False)
        super().__init__(*args, timeout=timeout, **kwargs)

    def configure_ddp(self) -> None:
        module = self.model
        nets = getattr(module, "nets", None)
        if not isinstance(nets, TrainingNetworks):
            raise TypeError(f"{type(self).__name__} needs a LightningModule whose `nets` is a TrainingNetworks; "
                            "use DDPStrategy for other modules")
        device_ids = self.determine_ddp_device_ids()
        nets.set_ddp(
            DistributedDataParallel(nets.generator, device_ids=device_ids, **self._ddp_kwargs),
            DistributedDataParallel(nets.discriminator, device_ids=device_ids, **self._ddp_kwargs),
        )
        # self.model stays the LightningModule itself: no reducer spans both networks

    def teardown(self) -> None:
        nets = getattr(self.lightning_module, "nets", None)
        if isinstance(nets, TrainingNetworks):
            nets.set_ddp(None, None)
        super().teardown()
