"""Errors a user can cause. The CLI prints these as one clear line (no traceback) and exits with status 2."""

import argparse
import difflib
import errno
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class SaganError(Exception):
    """Base class: a problem with the user's input (config, data, checkpoint), with the fix in the message."""


class ConfigError(SaganError, ValueError):
    """An invalid configuration value."""


class DataError(SaganError):
    """Missing, empty or unreadable training data."""


class CheckpointError(SaganError):
    """A missing, corrupt or incompatible checkpoint."""


class OutOfMemory(SaganError):
    """The GPU (or the host) ran out of memory for a setting of the user's; the message names what to lower."""


class SaganWarning(UserWarning):
    """Something the user may want to change (a setting that does nothing, files left out); the CLI prints it as
    one line, ``sagan: warning: ...``, without the source location Python's default format adds. Under DDP every
    process makes the same checks, so only global rank 0 prints these."""


class RankWarning(SaganWarning):
    """A :class:`SaganWarning` about what one process alone met (an image its shard could not read): every rank
    prints its own, as ``sagan: warning: [rank N] ...`` on ranks other than 0."""


def option_keys(parser: argparse.ArgumentParser) -> set[str]:
    """Every ``--a.b`` (or ``--num-samples``) option of ``parser`` and its subcommands' parsers, without the dashes."""
    keys: set[str] = set()
    for action in parser._actions:
        keys.update(s[2:] for s in action.option_strings if s.startswith("--") and s not in ("--help", "--config"))
        if isinstance(action.choices, dict):  # subcommands: name -> parser
            for sub in action.choices.values():
                if isinstance(sub, argparse.ArgumentParser):
                    keys |= option_keys(sub)
    return keys


def did_you_mean(message: str, known: set[str]) -> str:
    """`` (did you mean --model.lecam_weight?)`` for a mistyped option on the command line or a mistyped key in a
    config file, as argparse and jsonargparse word them; empty when nothing is close. A name is compared first with
    the options of its own group (``model.lecm_weight``), then with every option's last part (``model.batch_size``
    is ``data.batch_size``)."""
    unknown = [("--", k) for k in re.findall(r"(?:^|\s)--([\w.-]+)", message.partition("unrecognized arguments:")[2])]
    m = re.search(r"(Group|Subcommand) '([\w.]+)' does not accept option '([\w.]+)'", message)
    if m:  # a key in a config file: named as a config key
        unknown.append(("", f"{m.group(2)}.{m.group(3)}" if m.group(1) == "Group" else m.group(3)))
    found = []
    for dashes, key in unknown:
        group, _, leaf = key.rpartition(".")
        same = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == group}
        close = difflib.get_close_matches(leaf, list(same), n=1, cutoff=0.7)
        by_leaf = sorted(k for k in known if k.rpartition(".")[2] == leaf)
        if close or by_leaf:
            found.append(dashes + (same[close[0]] if close else by_leaf[0]))
    return f" (did you mean {', '.join(found)}?)" if found else ""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose error for a mistyped option names the closest real one (``sagan evaluate``,
    ``generate``, ``prepare``; ``sagan fit``'s parser does the same through jsonargparse)."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        if message.startswith(("the following arguments are required", "one of the arguments")):
            # argparse checks required options before unrecognised ones: '--resolutoin 32' would be reported as
            # '--resolution is required'; name the mistyped option instead
            options = [s for action in self._actions for s in action.option_strings]
            unknown = [a.partition("=")[0] for a in getattr(self, "_argv", []) if a.startswith("--")
                       and not any(o.startswith(a.partition("=")[0]) for o in options)]
            if unknown:
                message = f"unrecognized arguments: {' '.join(unknown)}"
        super().error(f"{message}{did_you_mean(message, option_keys(self))}")


def is_out_of_memory(e: BaseException) -> bool:
    """torch's out-of-memory error: a GPU's (``torch.OutOfMemoryError``, CUDA or MPS) or the CPU allocator's (a
    ``RuntimeError``; where the kernel overcommits, the host kills the process instead, which nothing can catch)."""
    return type(e).__name__ == "OutOfMemoryError" or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def out_of_memory_message(e: BaseException, where: str, fix: str) -> str:
    """One line: the memory that ran out and ``where``, torch's figures (what was asked for, what the GPU has),
    and ``fix``."""
    text = " ".join(str(e).split())
    memory = "GPU" if "CUDA" in text else "MPS" if "MPS" in text else "host"
    figures = [m.replace("Tried", "tried") for m in re.findall(
        r"Tried to allocate [\d.]+ \w+|GPU \d+ has a total capacity of [\d.]+ \w+ of which [\d.]+ \w+ is free", text)]
    asked = re.search(r"you tried to allocate (\d+) bytes", text)
    if asked:
        figures.append(f"tried to allocate {int(asked.group(1)) / 2**30:.2f} GiB")
    return f"out of {memory} memory {where}" + (f" ({'; '.join(figures)})" if figures else "") + f": {fix}"


def lower_batch(flag: str, value: int) -> str:
    """The fix for running out of memory: ``lower --batch-size (now 64; e.g. --batch-size 32)``."""
    return f"lower {flag} (now {value}; e.g. {flag} {max(1, value // 2)})"


@contextmanager
def out_of_memory_advice(where: str, fix: str) -> Iterator[None]:
    """Turn torch's out-of-memory error inside the block into :class:`OutOfMemory`, worded by
    :func:`out_of_memory_message`, so the CLI prints one line that names the setting to lower."""
    try:
        yield
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        raise OutOfMemory(out_of_memory_message(e, where, fix)) from e


def is_disk_full(e: BaseException) -> bool:
    """An ``OSError`` for a full disk or an exhausted quota."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def _disk_full_words(e: OSError) -> str:
    return "the disk quota is exhausted" if e.errno == errno.EDQUOT else "the disk is full"


def disk_full_message(e: OSError, where: str) -> str:
    """One line for a full disk met while writing: the file when the error names it, else ``where``."""
    return f"could not write {str(e.filename or where)!r}: {_disk_full_words(e)}"


def disk_full_exit(prog: str, e: OSError, where: str, fix: str) -> int:
    """A command's answer to an ``OSError`` met while writing: a full disk is one line on stderr and exit status 2
    (``where`` names what was being written when the error does not); any other error is raised again."""
    if not is_disk_full(e):
        raise e
    print(f"{prog}: error: {disk_full_message(e, where)}: {fix}", file=sys.stderr)
    return 2


def write_failure_reason(e: BaseException, folder: Path) -> str:
    """The cause of a failed write in words: a full disk (by errno, or by the free space left, since torch's writer
    drops the errno), else the error's own last line."""
    if is_disk_full(e):
        return _disk_full_words(e)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < 1 << 20:
        return f"the disk is full ({free // 1024} KiB free on the device holding {str(folder)!r})"
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return f"the write failed ({str(e).strip().splitlines()[-1]})"
