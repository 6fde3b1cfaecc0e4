"""``sagan evaluate``: FID / IS / KID of a checkpoint's generator, or of one image folder against another.

    sagan evaluate --ckpt outputs/digits/checkpoints/last.ckpt --num-samples 1000 --metrics fid,kid,isc --floor
    sagan evaluate --ckpt outputs/cifar10/checkpoints/best.ckpt --num-samples 50000 --metrics fid,isc
    sagan evaluate --folders generated/ real/ --metrics fid,kid

The reference set is the checkpoint's own training data (its data settings are stored in the checkpoint; a
``--config`` YAML's ``data:`` section overrides them), without augmentation, at the model's resolution. Reference
statistics are cached. The table is printed and written as JSON next to the checkpoint (``last.metrics.json``)
together with the protocol: image counts, reference split, feature extractor and the hash of its weights, seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import SaganError
from .metrics import INCEPTION, MetricsError, UInt8Images, compute_metrics, parse_metrics, resolve_feature_extractor


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sagan evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="checkpoint written by 'sagan fit'")
    src.add_argument("--folders", nargs=2, metavar=("FIRST", "SECOND"), help="compare two image folders")
    p.add_argument("--config", help="YAML whose data: section replaces the checkpoint's data settings")
    p.add_argument("--data-root", help="override data.root (e.g. the data set lives elsewhere on this machine)")
    p.add_argument("--num-samples", type=int, default=10000, help="generated images (default 10000)")
    p.add_argument("--metrics", default="fid", help="comma-separated subset of fid,isc,kid,prc (default fid)")
    p.add_argument("--feature-extractor", default="auto",
                   help=f"'auto' (digits-mlp for the digits set, else {INCEPTION}) or a torch-fidelity name")
    p.add_argument("--weights", help="feature-extractor weights file (else $SAGAN_INCEPTION_WEIGHTS, hub cache, download)")
    p.add_argument("--fid-layer", help="feature layer for FID/KID (default: the extractor's, 2048 for Inception)")
    p.add_argument("--ref-split", default="train", help="reference split of the training data (default train)")
    p.add_argument("--floor", action="store_true",
                   help="also score the held-out real split against the reference: the best a model can do")
    p.add_argument("--allow-few-samples", action="store_true",
                   help="compute FID/KID even on fewer images than feature dimensions (biased; noted in the protocol)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw generator instead of the EMA one")
    p.add_argument("--cache-root", help="folder of cached reference statistics (default torch-fidelity's)")
    p.add_argument("--json", help="where to write the JSON (default: next to the checkpoint)")
    return p


def _datamodule(ckpt: dict[str, Any], config: str | None, data_root: str | None):
    from .data import SAGANData

    import inspect

    accepted = set(inspect.signature(SAGANData.__init__).parameters) - {"self"}
    hp = {k: v for k, v in (ckpt.get("datamodule_hyper_parameters") or {}).items() if k in accepted}
    if config:
        path = Path(config)
        if not path.is_file():
            raise SaganError(f"config {config!r} does not exist")
        data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
        hp.update(data.get("init_args", data))
    if data_root:
        hp["root"] = data_root
    if not hp:
        raise SaganError("the checkpoint stores no data settings: pass --config with a data: section")
    try:
        return SAGANData(**hp)
    except TypeError as e:
        raise SaganError(f"bad data settings {sorted(hp)}: {e}") from None


def _table(rows: dict[str, dict[str, float]]) -> str:
    cols = list(rows)
    names = list(dict.fromkeys(k for r in rows.values() for k in r))
    width = max(14, *(len(c) + 2 for c in cols))
    lines = ["metric".ljust(12) + "".join(c.rjust(width) for c in cols)]
    for n in names:
        lines.append(n.ljust(12) + "".join(
            (f"{rows[c][n]:.4f}" if n in rows[c] else "-").rjust(width) for c in cols))
    return "\n".join(lines)


def evaluate_checkpoint(a: argparse.Namespace) -> dict[str, Any]:
    from .features import DIGITS_FEATURE_EXTRACTOR
    from .sampling import generator_from_checkpoint, load_checkpoint

    if a.num_samples < 1:
        raise MetricsError(f"--num-samples must be a positive integer, got {a.num_samples}")
    ckpt = load_checkpoint(a.ckpt)
    dm = _datamodule(ckpt, a.config, a.data_root)
    device = torch.device(a.device) if a.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = generator_from_checkpoint(ckpt, ema=not a.no_ema, device=device)
    if (g.resolution, g.img_channels) != (dm.resolution, dm.channels):
        raise SaganError(
            f"the checkpoint's generator makes {g.img_channels}x{g.resolution}x{g.resolution} images but the data "
            f"settings give {dm.channels}x{dm.resolution}x{dm.resolution}: fix --config / the data section"
        )
    fe = a.feature_extractor
    if fe == "auto":
        fe = DIGITS_FEATURE_EXTRACTOR if dm.dataset == "digits" else INCEPTION
    spec = resolve_feature_extractor(fe, a.weights)
    cache_name = f"sagan-{dm.dataset}-{a.ref_split}-{dm.fingerprint(a.ref_split)}-{spec.weights_sha256[:12]}"
    reference = UInt8Images(dm.build_dataset(a.ref_split, augment=False))
    common = dict(metrics=a.metrics, feature_extractor=spec, fid_layer=a.fid_layer, input2_cache_name=cache_name,
                  cache_root=a.cache_root, seed=a.seed, batch_size=a.batch_size, device=device,
                  allow_few_samples=a.allow_few_samples)
    label = "generated (EMA)" if not a.no_ema else "generated (raw G)"
    res = compute_metrics(g, reference, num_samples=a.num_samples, **common)
    rows = {label: res.values}
    protocol = dict(res.protocol)
    protocol.update(
        checkpoint=str(Path(a.ckpt).resolve()),
        iteration=(ckpt.get("sagan") or {}).get("g_steps"),
        ema=not a.no_ema,
        num_generated=a.num_samples,
        num_reference=len(reference),
        reference={"dataset": dm.dataset, "root": dm.root, "split": a.ref_split, "resolution": dm.resolution,
                   "channels": dm.channels, "fingerprint": dm.fingerprint(a.ref_split)},
    )
    out: dict[str, Any] = {"metrics": res.values, "protocol": protocol}
    if a.floor:
        held_out = [s for s in dm.splits if s != a.ref_split]
        if not held_out:
            raise SaganError(f"--floor needs a held-out split, and data set {dm.dataset!r} has only {list(dm.splits)}")
        real = UInt8Images(dm.build_dataset(held_out[0], augment=False))
        floor = compute_metrics(real, reference, **common)
        rows[f"real {held_out[0]} (floor)"] = floor.values
        out["floor"] = {"metrics": floor.values, "split": held_out[0], "num_images": len(real)}
    print(_table(rows))
    print(f"protocol: {a.num_samples} generated vs {len(reference)} reference images ({dm.dataset}/{a.ref_split}, "
          f"{dm.resolution}px), features {spec.name} (weights sha256 {spec.weights_sha256}), seed {a.seed}")
    json_path = Path(a.json) if a.json else Path(a.ckpt).with_suffix(".metrics.json")
    return out | {"_json": json_path}


def evaluate_folders(a: argparse.Namespace) -> dict[str, Any]:
    fe = INCEPTION if a.feature_extractor == "auto" else a.feature_extractor
    spec = resolve_feature_extractor(fe, a.weights)
    first, second = a.folders
    res = compute_metrics(first, second, metrics=a.metrics, feature_extractor=spec, fid_layer=a.fid_layer,
                          seed=a.seed, batch_size=a.batch_size, device=a.device,
                          allow_few_samples=a.allow_few_samples)
    print(_table({f"{first} vs {second}": res.values}))
    protocol = dict(res.protocol) | {"first": str(Path(first).resolve()), "second": str(Path(second).resolve())}
    return {"metrics": res.values, "protocol": protocol, "_json": Path(a.json) if a.json else None}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        parse_metrics(a.metrics)
        out = evaluate_checkpoint(a) if a.ckpt else evaluate_folders(a)
    except SaganError as e:
        print(f"sagan evaluate: error: {e}", file=sys.stderr)
        return 2
    json_path = out.pop("_json")
    if json_path is not None:
        json_path.write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"wrote {json_path}")
    return 0
