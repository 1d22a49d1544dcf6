"""Probe: can a classifier's features tell where in the head a slice comes from?

    python benchmarks/probe.py MANIFEST BUNDLE [BUNDLE ...]

With few subjects the tumour-free slices are the top and bottom of the head, so a classifier can
score "pathological" by reading the slice's level instead of the lesion. This fits a linear probe
(PCA to 16 components, then ridge) from each bundle classifier's pooled trunk features (t = 0)
to the slice's distance from the middle of its volume (0 = middle, 1 = first or last kept
slice) on the train split and prints R^2 on the val split, next to the same probe on the raw
slices (8x8 average-pooled) as a reference. A classifier
that reads the level has an R^2 near the raw slices'; one that does not, lower. Also printed: the
classifier's slice AUROC on val at t = 0.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA
from sklearn.linear_model import RidgeCV
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.pipeline import make_pipeline

from anomaly_diffusion.data.datasets import SliceDataset, load_slices
from anomaly_diffusion.data.manifest import read_manifest
from anomaly_diffusion.labels import PATHOLOGICAL
from anomaly_diffusion.models.bundle import ModelBundle, load_bundle


def extremity(subjects: np.ndarray) -> np.ndarray:
    """(N,) how far each slice lies from its volume's middle: 0 in the middle, 1 at the first or last kept
    slice (slices come in order). Top and bottom are where the tumour-free slices are."""
    level = np.zeros(len(subjects))
    for subject in np.unique(subjects):
        index = np.nonzero(subjects == subject)[0]
        level[index] = np.abs(np.linspace(-1, 1, len(index)))
    return level


def features(bundle: ModelBundle, images: torch.Tensor, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Pooled trunk features (N, C_L) and p(pathological) (N,) of the classifier at t = 0."""
    classifier = bundle.classifier
    pooled, p_path = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            x = images[start : start + batch]
            t = torch.zeros(len(x), dtype=torch.long)
            f = classifier.trunk(x, t).reshape(len(x), classifier.width, -1).mean(dim=2)
            pooled.append(f.numpy())
            p_path.append(torch.softmax(classifier(x, t).float(), dim=1)[:, PATHOLOGICAL].numpy())
    return np.concatenate(pooled), np.concatenate(p_path)


def probe_r2(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray) -> float:
    """R^2 on val of PCA (16 components, fit on train) + ridge (alpha by leave-one-out on train)."""
    model = make_pipeline(PCA(n_components=16, random_state=0), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    model.fit(train_x, train_y)
    return float(r2_score(val_y, model.predict(val_x)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("bundles", type=Path, nargs="+")
    args = parser.parse_args()
    rows = read_manifest(args.manifest)
    first = load_bundle(args.bundles[0])
    data: dict[str, SliceDataset] = {
        split: load_slices([r for r in rows if r.split == split], first.config.data) for split in ("train", "val")
    }
    levels = {split: extremity(d.subjects) for split, d in data.items()}
    raw = {split: F.avg_pool2d(d.images, d.images.shape[-1] // 8).flatten(1).numpy() for split, d in data.items()}
    r2_raw = probe_r2(raw["train"], levels["train"], raw["val"], levels["val"])
    print("| input to the level probe | R^2 of distance from mid-volume (val) | classifier slice AUROC (val, t=0) |")
    print("|---|---|---|")
    print(f"| raw slices, 8x8 average-pooled | {r2_raw:.3f} | |")
    for path in args.bundles:
        bundle = load_bundle(path)
        f_train, _ = features(bundle, data["train"].images)
        f_val, p_val = features(bundle, data["val"].images)
        r2 = probe_r2(f_train, levels["train"], f_val, levels["val"])
        auroc = roc_auc_score(data["val"].labels.numpy() == PATHOLOGICAL, p_val)
        print(f"| classifier features: {path} | {r2:.3f} | {auroc:.3f} |", flush=True)


if __name__ == "__main__":
    main()
