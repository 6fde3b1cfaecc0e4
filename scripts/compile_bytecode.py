"""Byte-compile the installed modules that sagan's commands import: run once by `make install`.

    python scripts/compile_bytecode.py

`make install` runs pip with --no-compile: compiling every module of torch and its neighbours costs about a minute
on 2 cores, and Python compiles a module on its first import and keeps the .pyc. Where PYTHONDONTWRITEBYTECODE is
set (CI machines and containers often set it) Python keeps nothing, so every `sagan` process compiled the same
torch, Lightning and torchvision modules again: `import sagan.cli` took 19 s instead of 7 s on 2 cores, in each of
`make demo`'s three commands and each process the tests start. This imports what the commands import and writes
the .pyc of each module that came from the environment's site-packages; the source tree is left alone.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import py_compile
import sys
import sysconfig
import time
from pathlib import Path

# what sagan's modules import, and what the commands import lazily (in-loop FID, W&B runs, the digits classifier,
# DDP) or the tests use
THIRD_PARTY = ["torch", "torchvision", "pytorch_lightning", "pytorch_lightning.cli", "torch_fidelity", "wandb",
               "pytorch_lightning.loggers.wandb", "sklearn.svm", "scipy.linalg", "torch.distributed.elastic",
               "PIL.Image", "yaml", "pytest"]


def _import_all(names: list[str]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional extra that is not installed (pytest outside `make test`)
            pass


def main() -> None:
    t0 = time.perf_counter()
    keep = sys.dont_write_bytecode
    sys.dont_write_bytecode = False  # the import system writes each .pyc as it compiles the module
    _import_all(THIRD_PARTY)
    sys.dont_write_bytecode = keep  # sagan's own modules: no __pycache__ in the source tree unless Python writes it
    import sagan

    _import_all([m.name for m in pkgutil.walk_packages(sagan.__path__, "sagan.")])
    roots = {Path(p).resolve() for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])}
    done = 0
    for module in list(sys.modules.values()):  # modules that only sagan's imports pulled in
        path = getattr(module, "__file__", None)
        if not path or not path.endswith(".py"):
            continue
        source = Path(path).resolve()
        if not any(root in source.parents for root in roots):
            continue
        cached = Path(importlib.util.cache_from_source(str(source)))
        if cached.exists():
            continue
        try:
            py_compile.compile(str(source), cfile=str(cached), doraise=True)
            done += 1
        except (py_compile.PyCompileError, OSError):  # a read-only or odd file: Python compiles it in memory
            pass
    n = sum(1 for m in sys.modules.values() if str(getattr(m, "__file__", "")).endswith(".py"))
    print(f"compile_bytecode: {n} modules imported, {done} compiled after them, in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
