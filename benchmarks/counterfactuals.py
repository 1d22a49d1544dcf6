"""Counterfactuals of several methods side by side, on the same slices: what each one repaints.

    python benchmarks/counterfactuals.py MANIFEST BUNDLE --split test \
        --method 'old:L=100;s=300;K=25;g=regions;r=abs;sm=0' --method 'new:L=100;s=300;K=25;g=regions;r=pos;rc=0;sm=4' \
        --out DIR

For each volume of the split, the kept slice with the largest lesion (model resolution) and, with
`--healthy`, the first lesion-free slice. Each method (the `adiff evaluate` method grammar) explains
those slices through the package's own pipeline (`explain.SliceDecodings`; a slice is explained the
same alone or in a volume: no layer mixes slices). Writes DIR/counterfactuals.png: per slice, the
input (channel 0), then per method its counterfactual and its map, then the ground truth; and
DIR/counterfactuals.json with each panel's subject, slice and per-method change outside the lesion.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from anomaly_diffusion.counterfactual.cache import SliceDecodings
from anomaly_diffusion.data.io import load_scan, read_mask
from anomaly_diffusion.data.manifest import read_manifest
from anomaly_diffusion.data.transforms import mask_to_slices
from anomaly_diffusion.errors import AdiffError, InputError
from anomaly_diffusion.evaluation.grammar import parse_method
from anomaly_diffusion.evaluation.methods import bind_methods
from anomaly_diffusion.runtime import prepare_for_inference
from anomaly_diffusion.scans import prepare_scan
from anomaly_diffusion.usecases.common import load_model


def picked_slices(manifest: Path, split: str, bundle, healthy: bool):
    """(subject, kept index, x (1, C, S, S), truth (S, S)) per volume: the largest lesion, and a clean slice."""
    rows = [r for r in read_manifest(manifest) if r.split == split and r.mask is not None]
    if not rows:
        raise InputError(f"{manifest}: no volumes with masks in the {split} split")
    for row in rows:
        scan = load_scan(row.images, expected_channels=bundle.config.data.image_channels)
        brain = read_mask(row.brainmask, scan) if row.brainmask else None
        prepared = prepare_scan(bundle.config.data, scan, brain)
        truth = mask_to_slices(read_mask(row.mask, scan), prepared.state)
        area = truth.sum(dim=(1, 2))
        picks = [int(area.argmax())]
        if healthy and bool((area == 0).any()):
            picks.append(int(torch.nonzero(area == 0)[len(torch.nonzero(area == 0)) // 2]))
        for i in picks:
            yield row.subject, int(prepared.state.kept[i]), prepared.x[i : i + 1], truth[i]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--method", action="append", required=True, help="NAME:KEY=VALUE;... (repeat).")
    parser.add_argument("--healthy", action="store_true", help="Also a lesion-free slice of each volume.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dpi", type=int, default=80)
    args = parser.parse_args()
    try:
        bundle, _, _ = load_model(args.bundle, "sqlite:///:memory:")
        bundle = prepare_for_inference(bundle)
        specs = [s.replace(";", ",") for s in args.method]
        methods = bind_methods([parse_method(s, bundle.config) for s in specs], bundle)
        panels = []
        for subject, k, x, truth in picked_slices(args.manifest, args.split, bundle, args.healthy):
            cache = SliceDecodings(bundle, x)
            explained = [cache.explanation(m.plans[0]) for m in methods]
            panels.append((subject, k, x, truth, explained))
    except AdiffError as exc:
        sys.exit(f"error: {exc}")
    columns = 2 + 2 * len(methods)
    fig, axes = plt.subplots(len(panels), columns, figsize=(1.6 * columns, 1.7 * len(panels)), squeeze=False)
    summary = []
    for row, (subject, k, x, truth, explained) in enumerate(panels):
        ax = axes[row]
        ax[0].imshow(x[0, 0].numpy(), cmap="gray")
        ax[0].set_title(f"{subject[-12:]}\nslice {k}", fontsize=6)
        outside = ~truth.numpy()
        entry = {"subject": subject, "slice": k, "lesion_pixels": int(truth.sum())}
        window = {"vmin": float(x[0, 0].min()), "vmax": float(x[0, 0].max())}  # the input's grey levels
        for j, (method, e) in enumerate(zip(methods, explained, strict=True)):
            ax[1 + 2 * j].imshow(e.x_healthy[0, 0].numpy(), cmap="gray", **window)
            ax[1 + 2 * j].set_title(f"{method.name}\ncounterfactual", fontsize=6)
            ax[2 + 2 * j].imshow(e.anomaly_map[0].numpy(), cmap="inferno")
            ax[2 + 2 * j].set_title(f"{method.name}\nmap", fontsize=6)
            change = (x - e.x_healthy).abs().mean(dim=1)[0].numpy()
            entry[method.name] = {"change_outside_lesion": float(change[outside].mean())}
        ax[-1].imshow(truth.numpy(), cmap="gray")
        ax[-1].set_title("truth", fontsize=6)
        for a in ax:
            a.axis("off")
        summary.append(entry)
    args.out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out / "counterfactuals.png", dpi=args.dpi)
    (args.out / "counterfactuals.json").write_text(json.dumps({"methods": args.method, "panels": summary}, indent=2))
    print(f"wrote {args.out / 'counterfactuals.png'}")


if __name__ == "__main__":
    main()
