"""The ``sagan`` command line: ``fit`` (LightningCLI, configured by YAML in ``configs/``), ``evaluate``, ``generate``
and ``prepare``.

    sagan fit --config configs/digits.yaml
    sagan fit --config configs/cifar10.yaml --data.root data/cifar10
    sagan fit --config configs/digits.yaml --print_config
    sagan evaluate --ckpt outputs/digits/checkpoints/last.ckpt --metrics fid,kid,isc --floor
    sagan generate --ckpt outputs/digits/checkpoints/last.ckpt --outdir samples --per-class --num 10 --grid
    sagan prepare --source data/celeba --out data/celeba64 --resolution 64

A run writes to ``<output_root>/<experiment>/``: ``checkpoints/last.ckpt``, ``samples/step_*.png`` and the
resolved ``config.yaml``. Errors the user can cause are printed as one line and exit with status 2.
"""

from __future__ import annotations

import logging
import operator
import os
import re
import sys
import warnings
from pathlib import Path

import yaml

import torch
from lightning_utilities.core.imports import compare_version
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from .checkpointing import AtomicCheckpointIO, Checkpoint, Preemption
from .callbacks import (AttentionMaps, FastMath, FIDEvaluation, LoaderMonitor, RunSummary, SampleGrid,
                        WandbDashboard, wandb_loggers)
from .data import SAGANData
from .errors import (ConfigError, OutOfMemory, RankWarning, SaganError, SaganWarning, did_you_mean,
                     disk_full_message, is_disk_full, is_out_of_memory, lower_batch, option_keys,
                     out_of_memory_message)
from .files import user_path
from .module import SAGAN
from .progress import LineProgress, interactive
from .strategy import GANDDPStrategy


def _run_dir(output_root: str, experiment: str) -> str:
    return str(Path(user_path(output_root)) / experiment)


def _ckpt_dir(output_root: str, experiment: str) -> str:
    return str(Path(user_path(output_root)) / experiment / "checkpoints")


def _samples_dir(output_root: str, experiment: str) -> str:
    return str(Path(user_path(output_root)) / experiment / "samples")


def _attention_dir(output_root: str, experiment: str) -> str:
    return str(Path(user_path(output_root)) / experiment / "attention")


def wandb_configured() -> bool:
    """Whether the user has set W&B up (an API key in the environment or in ~/.netrc); else runs stay offline."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class SaveRunConfig(SaveConfigCallback):
    """Saves the resolved config as ``<run dir>/config.yaml`` (rank 0), overwriting the previous run's copy.

    Writing next to the checkpoints rather than into a logger's folder keeps one config per experiment folder and
    avoids the LightningCLI / WandbLogger ``config.yaml`` collision (Lightning #17168).
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.update(save_to_log_dir=False, overwrite=True)
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        run_dir = Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / self.config_filename
        # every value, None included (jsonargparse 4.49 renamed skip_none to skip_unset and warns on the old name)
        new_name = compare_version("jsonargparse", operator.ge, "4.49")
        keep_none = {"skip_unset": False} if new_name else {"skip_none": False}
        self.parser.save(self.config, str(path), overwrite=True, **keep_none)
        for lg in wandb_loggers(trainer):  # the resolved config with the run (W&B's own config.yaml is not touched)
            lg.experiment.config.update({"cli": yaml.safe_load(path.read_text())}, allow_val_change=True)


class _Parser(LightningArgumentParser):
    """On a bad argument or config key, print the error and the --help tip only, not the full usage."""

    def print_usage(self, file=None) -> None:  # noqa: ARG002
        pass

    def error(self, message: str, *args, **kwargs):
        if "default_root_dir" in str(message):
            message = ("trainer.default_root_dir is set by the sagan command from --output_root and --experiment "
                       "(a run writes to OUTPUT_ROOT/EXPERIMENT): use --output_root DIR [--experiment NAME] instead")
        else:
            message = f"{message}{did_you_mean(str(message), option_keys(self))}"
        return super().error(message, *args, **kwargs)


class SAGANCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` only: the model has no validation / test / predict step (evaluation is ``sagan evaluate``)."""
        return {"fit": set(LightningCLI.subcommands()["fit"])}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--experiment", type=str, default="sagan", help="run name: outputs go to OUTPUT_ROOT/EXPERIMENT")
        parser.add_argument("--output_root", type=str, default="outputs", help="folder that holds all runs")
        parser.add_argument(
            "--overwrite", type=bool, default=False,
            help="start a fresh run even if OUTPUT_ROOT/EXPERIMENT already holds a checkpoint (the old run's "
                 "checkpoints, sample grids and attention maps move to previous/ in their folders when the new "
                 "run writes its first)",
        )
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        # last.ckpt every N optimizer steps, on SIGTERM / SIGUSR1 and on errors; the newest 3 periodic ones kept
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 3, "checkpoint.monitor": "step",
                             "checkpoint.mode": "max", "checkpoint.filename": "step={step}",
                             "checkpoint.auto_insert_metric_name": False, "checkpoint.every_n_train_steps": 1000,
                             "checkpoint.save_on_exception": True,
                             # a run's files keep their names (--overwrite replaces last.ckpt, no last-v1.ckpt)
                             "checkpoint.enable_version_counter": False})
        parser.add_lightning_class_args(Preemption, "preemption")
        parser.add_lightning_class_args(SampleGrid, "samples")
        parser.add_lightning_class_args(FIDEvaluation, "fid")
        parser.add_lightning_class_args(AttentionMaps, "attention_maps")
        parser.add_lightning_class_args(WandbDashboard, "wandb_dashboard")
        parser.add_lightning_class_args(RunSummary, "summary")
        parser.add_lightning_class_args(LoaderMonitor, "loader_monitor")
        parser.add_lightning_class_args(FastMath, "fast_math")
        runs = ("output_root", "experiment")
        parser.link_arguments(runs, "trainer.default_root_dir", compute_fn=_run_dir)
        parser.link_arguments(runs, "checkpoint.dirpath", compute_fn=_ckpt_dir)
        parser.link_arguments(runs, "samples.dirpath", compute_fn=_samples_dir)
        parser.link_arguments(runs, "fid.dirpath", compute_fn=_ckpt_dir)
        parser.link_arguments(runs, "attention_maps.dirpath", compute_fn=_attention_dir)
        parser.link_arguments("data.resolution", "model.resolution")
        parser.link_arguments("data.channels", "model.img_channels", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


    def before_instantiate_classes(self) -> None:
        if self.subcommand != "fit":
            return
        cfg = self.config[self.subcommand]
        if cfg.ckpt_path and cfg.ckpt_path.startswith("~"):  # not "last", "hpc", "registry:..."
            cfg.ckpt_path = user_path(cfg.ckpt_path)
        self._configure_wandb(cfg)
        run_dir = Path(_run_dir(cfg.output_root, cfg.experiment))
        try:  # an unwritable output folder fails now, not at the first checkpoint
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise SaganError(
                f"the output folder {str(run_dir)!r} is not writable ({e.strerror or e}): choose another "
                "--output_root or --experiment"
            ) from None
        # Lightning's own errors for these suggest "switch to automatic optimization", which a sagan user cannot do
        trainer = cfg.trainer
        if trainer.get("gradient_clip_val") not in (None, 0, 0.0):
            raise ConfigError(
                f"trainer.gradient_clip_val {trainer.gradient_clip_val} is not supported: sagan's D and G steps "
                "optimise by hand (one Lightning step each), where Lightning cannot clip; drop it (spectral norm "
                "already bounds D, and model.nonfinite guards against blow-ups)")
        if trainer.get("accumulate_grad_batches") not in (None, 1):
            raise ConfigError(
                f"trainer.accumulate_grad_batches {trainer.accumulate_grad_batches} is not supported: sagan's D and G "
                "steps optimise by hand, where Lightning cannot accumulate; raise data.batch_size, or train on more "
                "devices (the batch is per device)")
        precision = str(trainer.get("precision") or "32-true")
        if precision in ("64", "64-true", "16-true", "bf16-true") or "transformer-engine" in precision:
            # a network cast to half or double precision met float32 latents, images and spectral-norm vectors in
            # the first step (a traceback); GAN training keeps float32 weights
            raise ConfigError(
                f"trainer.precision {precision} is not supported: sagan trains float32 weights (spectral norm's power "
                "iteration, Adam's moments and the EMA need them); use bf16-mixed (bfloat16 autocast, on GPUs from "
                "Ampere on), 16-mixed (float16 autocast with a gradient scaler) or 32-true")
        strategy = trainer.get("strategy")
        if isinstance(strategy, str) and strategy.startswith("ddp_spawn"):  # a traceback when the worker started
            raise ConfigError(
                f"trainer.strategy {strategy} starts its processes by pickling the model, which torch cannot do for "
                "spectral norm's parametrized layers: use ddp (configs/trainer/ddp.yaml), or ddp_notebook in a notebook")
        if isinstance(strategy, str) and strategy.startswith(("fsdp", "deepspeed", "xla", "single_tpu", "single_xla")):
            raise ConfigError(
                f"trainer.strategy {strategy} is not supported: sagan steps G and D by hand, one optimizer each, with "
                "one DistributedDataParallel per network (ddp; configs/trainer/ddp.yaml), and needs no sharding (the "
                "largest config, imagenet128, trains 71M parameters)")
        accelerator = trainer.get("accelerator")
        if trainer.get("sync_batchnorm") and (accelerator in ("cpu", "mps") or (
                accelerator == "auto" and not torch.cuda.is_available())):
            # torch's SyncBatchNorm raises inside DDP's constructor on any other device: configs/trainer/ddp.yaml
            # with --trainer.accelerator cpu (a trial run of the multi-GPU setup) ended in that traceback
            trainer.sync_batchnorm = False
            warnings.warn(f"trainer.sync_batchnorm is ignored: torch's SyncBatchNorm runs on CUDA GPUs only, and "
                          f"this run is on the {'CPU' if accelerator != 'mps' else 'MPS device'}; each process's G "
                          "normalises with its own batch's statistics", SaganWarning, stacklevel=1)
        last = Path(_ckpt_dir(cfg.output_root, cfg.experiment)) / "last.ckpt"
        if cfg.ckpt_path is None and last.exists() and not cfg.overwrite and not trainer.get("fast_dev_run"):
            raise SaganError(
                f"{last} already exists: resume that run with --ckpt_path last, choose another --experiment, "
                "or pass --overwrite true to start afresh and replace it"
            )
        if cfg.ckpt_path == "last" and not last.exists():
            # Lightning starts afresh too (a requeued job's first start), but says so with a hint about its own
            # ModelCheckpoint arguments; a mistyped --experiment or --output_root should be visible at once.
            warnings.warn(f"--ckpt_path last: there is no checkpoint at {last} yet, so this is a fresh run (check "
                          "--experiment and --output_root if you meant to resume)", SaganWarning, stacklevel=1)


    @staticmethod
    def _configure_wandb(cfg) -> None:
        """Fill a WandbLogger's unset save_dir / name from the run, and keep it offline unless W&B is set up.

        A resumed run that logs online continues the W&B run its checkpoint was written by (the id the checkpoint
        records, ``resume="allow"``), so one run's curves stay in one W&B run across restarts and requeues. Offline,
        each start is its own offline run with a fresh id: W&B cannot resume an offline run (wandb/wandb#2423), and
        syncing two offline runs of one id may overwrite the first one's history (wandb/wandb#3841)."""
        loggers = cfg.trainer.logger if isinstance(cfg.trainer.logger, list) else [cfg.trainer.logger]
        for lg in loggers:
            if not (hasattr(lg, "class_path") and lg.class_path.endswith("WandbLogger")):
                continue
            args = lg.init_args
            if args.get("save_dir") in (None, "."):
                args["save_dir"] = _run_dir(cfg.output_root, cfg.experiment)
            if args.get("name") is None:
                args["name"] = cfg.experiment
            if not args.get("offline") and "WANDB_MODE" not in os.environ and not wandb_configured():
                args["offline"] = True
            if args.get("offline") and args.get("log_model"):
                # Lightning refuses log_model with offline=True (a traceback), though W&B's offline mode keeps
                # the checkpoints as artifacts of the offline run and `wandb sync` uploads them
                args["offline"], args["mode"] = False, "offline"
                warnings.warn("trainer.logger.log_model: this run logs to W&B offline (W&B is not set up here, or "
                              "offline was asked for), so its checkpoints are kept as artifacts of the offline run "
                              "(copies under W&B's staging folder, ~/.local/share/wandb) and uploaded when you "
                              "`wandb sync` it", SaganWarning, stacklevel=1)
            online = (not args.get("offline") and args.get("mode") not in ("offline", "disabled")
                      and os.environ.get("WANDB_MODE", "online") not in ("offline", "dryrun", "disabled"))
            if online and cfg.ckpt_path and args.get("id") is None and args.get("version") is None:
                run_id = _wandb_run_id(cfg.ckpt_path, _ckpt_dir(cfg.output_root, cfg.experiment))
                if run_id:
                    args["id"] = run_id
                    if args.get("resume") is None:
                        args["resume"] = "allow"


    def _parse_ckpt_path(self) -> None:
        """Lightning would overwrite the model config with the checkpoint's hyper-parameters (learning rates and
        all, silently, through an unguarded ``torch.load``). Here the config given is the config used: resuming
        with new learning rates works, and a checkpoint of another architecture is refused when it is restored,
        with the differences named (see ``SAGAN.on_load_checkpoint``)."""

    def instantiate_trainer(self, **kwargs) -> Trainer:
        strategy = _gan_strategy(self._get(self.config_init, "trainer", default={}))
        if strategy is not None:
            kwargs["strategy"] = strategy
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except MisconfigurationException as e:  # e.g. configs/trainer/gpu.yaml on a machine without a GPU
            no_gpu = "gpu" in str(e).lower() and not torch.cuda.is_available()
            raise ConfigError(f"the trainer settings do not fit this machine: {e}"
                              + (" (no CUDA GPU here: --trainer.accelerator auto or cpu, and drop configs/trainer/"
                                 "gpu.yaml)" if no_gpu else " (sagan fit --help lists the trainer options)")) from None
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # temp file + rename; weights_only loads
        for lg in wandb_loggers(trainer):  # Lightning passes anonymous=None, which W&B warns about on every run
            init = getattr(lg, "_wandb_init", None)
            if isinstance(init, dict) and "anonymous" in init and init["anonymous"] is None:
                del init["anonymous"]
            if type(lg) is WandbLogger:
                lg.__class__ = _WandbOrOffline
        if not interactive(sys.stdout):  # a log file, CI, SLURM: lines, not a redrawn bar
            for i, cb in enumerate(trainer.callbacks):
                if isinstance(cb, TQDMProgressBar):
                    trainer.callbacks[i] = LineProgress()
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        """Run the fit; where torch runs out of memory in a training step (a batch too large for the GPU, often at
        the first step), or torch.compile's own machinery fails (no C++ compiler), one line names the setting to
        change, not a traceback. The in-loop evaluation words its own (``fid.batch_size``, see
        :class:`FIDEvaluation`)."""
        try:
            super()._run_subcommand(subcommand)
        except RuntimeError as e:
            if self.model.hparams.get("compile") and _compile_error(e):
                fix = ("install one (g++ or clang++; or point $CXX to it), or " if "C++ compiler" in str(e) else "")
                raise ConfigError(f"model.compile: torch.compile failed ({type(e).__name__}: {_first_line(e)[:300]}): "
                                  f"{fix}train without it (--model.compile false); it pays on GPUs, and "
                                  "costs minutes of compilation on a CPU") from e
            if not is_out_of_memory(e):
                raise
            fix = lower_batch("--data.batch_size", self.datamodule.batch_size) + " (the batch of each process)"
            if "CUDA" in str(e):
                fix += (", train in bfloat16 autocast (--trainer.precision bf16-mixed), or share the batch among more "
                        "GPUs (--trainer.devices N with data.batch_size divided by N)")
            last = Path(self.trainer.checkpoint_callback.dirpath) / "last.ckpt"
            if last.exists():
                fix += f". The checkpoints written are intact: resume from {last} with --ckpt_path last"
            raise OutOfMemory(out_of_memory_message(
                e, f"in training at iteration {int(self.model.g_steps)}", fix)) from e


class _WandbOrOffline(WandbLogger):
    """Lightning's ``WandbLogger`` whose run, where W&B cannot be reached or refuses the login (a compute node
    without internet, an expired key), logs offline with one warning, so the training job goes on: W&B's error
    ended the fit at its start, after W&B's own retries (90 s), with a traceback. ``wandb sync`` uploads it later."""

    @property
    def experiment(self):  # noqa: ANN201 - W&B's Run (or Lightning's dummy on other ranks)
        from wandb.errors import Error as WandbError

        try:
            return WandbLogger.experiment.fget(self)
        except WandbError as e:
            if self._wandb_init.get("mode") == "offline":
                raise
            # a fresh offline run: W&B cannot continue a run offline (see SAGANCLI._configure_wandb)
            self._wandb_init.update(mode="offline", id=None)
            self._experiment = None
            warnings.warn(f"W&B could not start this run online ({type(e).__name__}: {_first_line(e)}): it logs "
                          f"offline instead, under {self.save_dir}/wandb; upload it with `wandb sync` where W&B is "
                          "reachable (WANDB_MODE=offline skips the wait on machines without internet)",
                          SaganWarning, stacklevel=1)
            return WandbLogger.experiment.fget(self)


def _wandb_run_id(ckpt_path: str, ckpt_dir: str) -> str | None:
    """The W&B run id that the checkpoint to resume from records, if any (``--ckpt_path last`` or a path).
    The checkpoint is memory-mapped, so only its small pickle is read; an unreadable one is left to the restore,
    which names the problem."""
    path = Path(ckpt_dir) / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - missing, foreign or truncated: the restore reports it
        return None
    run_id = state.get("wandb_run_id") if isinstance(state, dict) else None
    return run_id if isinstance(run_id, str) and run_id else None


FORK_DDP = ("ddp_fork", "ddp_fork_find_unused_parameters_false", "ddp_notebook",
            "ddp_notebook_find_unused_parameters_false")


def _gan_strategy(trainer_cfg: dict) -> GANDDPStrategy | None:
    """``--trainer.strategy ddp`` (or 'auto' on several devices or nodes) means the GAN-aware DDP here: one
    DistributedDataParallel per network (plain DDP around the whole module would need find_unused_parameters)."""
    strategy = trainer_cfg.get("strategy", "auto")
    if isinstance(strategy, str) and strategy in FORK_DDP:  # Lightning's fork launcher (notebooks): the same DDP
        return GANDDPStrategy(start_method="fork")
    if not isinstance(strategy, str) or strategy not in ("ddp", "auto", "ddp_find_unused_parameters_false"):
        return None
    if strategy == "auto":
        devices, accelerator = trainer_cfg.get("devices", "auto"), str(trainer_cfg.get("accelerator", "auto"))
        gpus = torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") else 0
        if isinstance(devices, (list, tuple)):
            n = len(devices)
        elif str(devices) in ("auto", "-1"):  # every GPU of the node (one process on a CPU)
            n = max(gpus, 1)
        else:
            n = int(devices)
        if n <= 1 and int(trainer_cfg.get("num_nodes", 1) or 1) <= 1:
            return None
    return GANDDPStrategy()


COMMANDS = {
    "fit": "train a model (LightningCLI + YAML): sagan fit --config configs/digits.yaml",
    "evaluate": "FID, precision/recall, KID, IS, spread and bins of a checkpoint or an image folder",
    "generate": "images, per-class grids, interpolations and attention maps from a checkpoint",
    "prepare": "decode an image folder once into a memory-mapped training set (large data sets)",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sagan")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def overview() -> str:
    """What ``sagan``, ``sagan -h`` and ``sagan --help`` print: the commands and where their options are."""
    width = max(map(len, COMMANDS))
    return "\n".join([
        f"usage: sagan {{{','.join(COMMANDS)}}} ...   (sagan {_version()}: Self-Attention GAN, Zhang et al. 2019)", "",
        "commands:", *(f"  {name.ljust(width)}  {text}" for name, text in COMMANDS.items()), "",
        "Each command's options: sagan COMMAND --help (sagan fit --help lists every model, data and trainer",
        "setting; sagan fit --config configs/digits.yaml --print_config shows a config resolved).",
    ])


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``sagan`` console script."""
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        sys.exit(0 if argv else 2)
    if argv[0] == "--version":
        print(f"sagan {_version()}")
        sys.exit(0)
    if argv[0] not in COMMANDS and not argv[0].startswith("-"):
        hint = " (evaluation is sagan evaluate)" if argv[0] in ("validate", "test", "predict") else ""
        print(f"sagan: error: {argv[0]!r} is not a sagan command{hint}: use one of {', '.join(COMMANDS)} "
              "(sagan --help)", file=sys.stderr)
        sys.exit(2)
    # The data module resumes mid-epoch exactly (see SAGANData.train_dataloader); Lightning's check for that is
    # made for automatic optimisation and misfires here.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # Checkpoints hold the state after an iteration's optimizer steps by design (a resume continues from there,
    # bit for bit); Lightning's notice about pre-optimisation state (with a code sample) only confuses a user.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n_train_steps")
    # sagan's own guard (SAGANCLI.before_instantiate_classes) already refuses a fresh run over a finished one and
    # says what to do; on a resume Lightning's notice about the non-empty checkpoint folder is expected noise. The
    # same for its notice about a missing last checkpoint, which sagan words itself.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r'\.fit\(ckpt_path="last"\) is set, but there is no last checkpoint')
    _quiet_third_party_notices()
    _one_line_sagan_warnings()
    if argv[0] in ("evaluate", "generate", "prepare"):
        try:
            sys.exit(_subcommand_main(argv[0])(argv[1:]))
        except KeyboardInterrupt:  # Ctrl-C: what was written stays (generate's images, prepare removes its part)
            print(f"sagan {argv[0]}: interrupted", file=sys.stderr)
            sys.exit(130)
        except RuntimeError as e:  # torchrun ... evaluate: another rank failed
            if not _peer_failed(e):
                raise
            _stopped_for_another_process(f"sagan {argv[0]}", e)
    try:
        SAGANCLI(
            SAGAN,
            SAGANData,
            save_config_callback=SaveRunConfig,
            parser_class=_Parser,
            args=args,
            auto_configure_optimizers=False,
        )
    except SaganError as e:
        _finish_wandb(exit_code=2)
        print(f"sagan: error: {_message(e)}", file=sys.stderr)
        sys.exit(2)
    except MisconfigurationException as e:  # Lightning's own checks of its classes' settings (checkpoint, trainer)
        _finish_wandb(exit_code=2)
        print(f"sagan: error: {e} (sagan fit --help lists the options)", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if not is_disk_full(e):
            _finish_wandb(exit_code=1)
            raise
        _finish_wandb(exit_code=2)
        print(f"sagan: error: {disk_full_message(e, 'a file of the run')}. The checkpoints already written are "
              "intact; free space (or choose another --output_root) and resume with --ckpt_path last", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        _finish_wandb(exit_code=1)
        if not _peer_failed(e):
            raise
        _stopped_for_another_process("sagan", e)
    except (ImportError, ValueError) as e:  # a class named in the config that cannot be built (missing package)
        said = _instantiation_error(e)
        _finish_wandb(exit_code=2 if said else 1)
        if said is None:
            raise
        print(f"sagan: error: {said}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C before training starts (Lightning handles it during the fit)
        _finish_wandb(exit_code=130)
        print("sagan: interrupted", file=sys.stderr)
        sys.exit(130)
    except BaseException:
        _finish_wandb(exit_code=1)
        raise
    _finish_wandb(exit_code=0)


def _subcommand_main(name: str):
    """The entry point of ``sagan evaluate``, ``generate`` or ``prepare`` (imported only when used)."""
    if name == "evaluate":
        from .evaluate import main
    elif name == "generate":
        from .generate import main
    else:
        from .prepared import main
    return main


class _DropAdvert(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def _quiet_third_party_notices() -> None:
    """Drop what other packages print on every run that a sagan user can neither act on nor needs: torch 2.14's
    deprecation of ``LeafSpec``, triggered inside Lightning's own code, Lightning's advertisement for its hosted
    logger and its warning that an epoch is shorter than the logging interval. (W&B's notice about the
    ``anonymous`` setting is removed at its source, in ``SAGANCLI.instantiate_trainer``.)"""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    # Lightning counts log_every_n_steps across epochs (its logger connector's step is the fit's batch count), so
    # its warning that an epoch has fewer batches than the interval is wrong: a small folder logs as a large one
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging")
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _DropAdvert) for f in rank_zero.filters):
        rank_zero.addFilter(_DropAdvert())


def _one_line_sagan_warnings() -> None:
    """Print sagan's own warnings (:class:`SaganWarning`) as ``sagan: warning: MESSAGE``. Python's default format
    adds the file and line of the call, which for a setting checked in ``__init__`` points into Lightning's CLI code
    that built the model, plus that line of code: noise to a user. Other packages' warnings keep their format;
    tools that record warnings (pytest) never format them, so they see the same warnings as before. Under DDP
    each process runs the same checks, so only global rank 0 prints them, as Lightning prints its own."""
    default = warnings.formatwarning
    if getattr(default, "sagan", False):
        return

    def formatwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
        if issubclass(category, SaganWarning):
            from lightning_fabric.utilities.rank_zero import rank_zero_only  # rank set from the environment on import

            rank = getattr(rank_zero_only, "rank", 0)
            if issubclass(category, RankWarning):
                return f"sagan: warning: {f'[rank {rank}] ' if rank else ''}{message}\n"
            return "" if rank else f"sagan: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    formatwarning.sagan = True  # type: ignore[attr-defined]
    warnings.formatwarning = formatwarning


def _finish_wandb(exit_code: int) -> None:
    """Close the W&B run of this process, if one was started, so its file is complete (also for in-process use)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


PEER_FAILURES = ("Connection closed by peer", "Connection reset by peer", "remote process exited")


def _peer_failed(e: BaseException) -> bool:
    """Whether ``e`` is a collective's failure because another process of the job went away (gloo's broken
    connection, NCCL's remote exit), rather than an error of this process."""
    dist_error = getattr(torch.distributed, "DistBackendError", ())
    return (isinstance(e, dist_error) or "gloo" in str(e)) and any(s in str(e) for s in PEER_FAILURES)


def _stopped_for_another_process(prog: str, e: BaseException) -> None:
    """Exit with one line where another rank failed (it printed its own error) and this one met the broken
    connection in a collective: not a traceback of torch's internals under the message that matters."""
    from .metrics import dist_info

    print(f"{prog}: error: [rank {dist_info()[0]}] stopped: another process of this job failed (its error is "
          f"printed above or in its own log) or the connection to it broke ({_first_line(e)})", file=sys.stderr)
    sys.exit(1)


def _instantiation_error(e: BaseException) -> str | None:
    """One line for a class named in the config or on the command line (a callback, a logger) that could not be
    built or set up because of a missing package (``RichProgressBar`` without rich, ``DeviceStatsMonitor`` without
    psutil) or a setting its own checks refuse: the cause under jsonargparse's wrapping, with the class path it
    names. None for any other error, which keeps its traceback."""
    chain, cause = [], e
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__
    root = chain[-1]
    if not isinstance(root, (ImportError, MisconfigurationException)):
        return None
    if root is e and not isinstance(e, ModuleNotFoundError):  # unwrapped: only a missing package, not a bug
        return None
    paths = [m.group(1) for c in chain if (m := re.search(r"Problem with given class_path '([^']+)'", str(c)))]
    message = " ".join(str(root).split())
    missing = " (a package it needs is not installed: install it, or drop that class)"
    return (f"{paths[-1]}: " if paths else "") + message + (missing if isinstance(root, ImportError) else "")


def _compile_error(e: BaseException) -> bool:
    """An error of torch.compile's own machinery (TorchDynamo, Inductor: no C++ compiler, an unsupported op), not
    of the model it compiles."""
    return any(c.__module__.startswith(("torch._dynamo", "torch._inductor")) for c in type(e).__mro__)


def _first_line(e: BaseException) -> str:
    """The first sentence of an error, without the source location a backend prefixes (``[.../pair.cc:561] ``)."""
    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    line = line.split("] ", 1)[1] if line.startswith("[") and "] " in line else line
    return line.split(". ", 1)[0].rstrip(".")


def _message(e: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker re-raised it with its traceback inside."""
    msg = str(e).strip()
    if "Original Traceback" in msg:
        msg = msg.splitlines()[-1]
        prefix = f"{type(e).__module__}.{type(e).__name__}: "
        msg = msg[len(prefix):] if msg.startswith(prefix) else msg
    return msg


if __name__ == "__main__":
    main()
