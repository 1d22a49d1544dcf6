"""A small offline demo dataset built from a real brain MRI: nilearn's MNI152 2009a template.

The template ships inside the nilearn wheel, so the dataset can be built on a fresh machine
without a network. Each subject is a plausible variation of the same brain:

1. the template (already skull-stripped, uint8 0..255, scaled here to 0..1) is downsampled
   once to ``voxel_size_mm`` isotropic with anti-aliasing;
2. a smooth random elastic deformation of a few mm and a small random affine (rotation up to
   5 degrees, scale +-5 %, shift +-2 mm) are composed into one sampling grid and applied with
   one interpolation to the T1, the white-matter probability and the brain mask;
3. a random gamma changes tissue contrast;
4. lesioned subjects get 1 to 3 blobby lesions centred in white matter (`add_lesions`) of one
   kind (`data.lesions.LESION_KINDS`): `bright`, blended towards 1.5-1.9x the subject's mean
   white-matter intensity, or `grey`, towards its mean grey-matter intensity (out of place, not
   out of range);
5. a smooth multiplicative bias field (+-10-15 %) and Gaussian noise (2-4 % of the mean brain
   intensity) imitate the scanner; everything outside the brain mask is zero, as in
   skull-stripped data.

Bright lesions are brighter than white matter, like white-matter lesions on FLAIR, although the
anatomy is a T1; grey ones look like a heterotopia. The point is a realistic brain with known
anomalies, one kind that a raw-intensity threshold finds and one that it cannot, not a faithful
simulation of a disease. Healthy subjects get an all-zero lesion mask so that slice labels can
be derived from the masks (a slice is pathological iff its mask slice has lesion voxels).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from scipy import ndimage

from anomaly_diffusion.data.lesions import LESION_KINDS, add_lesions, rotation_matrix
from anomaly_diffusion.data.manifest import SPLITS, ManifestRow, Split, write_manifest
from anomaly_diffusion.errors import ConfigError, InputError
from anomaly_diffusion.files import atomic_write, atomic_write_bytes

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
}


@dataclass(frozen=True)
class Template:
    """The MNI152 template resampled to an isotropic grid.

    Attributes:
        t1: T1 intensities scaled to 0..1, shape (X, Y, Z), float32.
        wm: white-matter probability 0..1, shape (X, Y, Z), float32.
        gm: grey-matter probability 0..1, same.
        brain: brain mask as a 0..1 float (fraction of the voxel in the brain), float32.
        affine: voxel-to-world (mm) matrix of the grid, shape (4, 4).
        voxel_size_mm: edge of the isotropic voxels.
    """

    t1: np.ndarray
    wm: np.ndarray
    gm: np.ndarray
    brain: np.ndarray
    affine: np.ndarray
    voxel_size_mm: float


def template_path(name: str) -> Path:
    """Return the path of one of nilearn's bundled MNI152 2009a files.

    Args:
        name: a key of `TEMPLATE_FILES` ("t1", "wm" or "gm").

    Raises:
        InputError: if nilearn or the file is missing.
    """
    # find_spec locates the installed package without importing it: importing
    # nilearn.datasets (as importlib.resources.files would) pulls in scikit-learn, about 1 s.
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the demo dataset needs nilearn's bundled MNI152 template; install nilearn")
    folders = [Path(p) / "datasets" / "data" for p in spec.submodule_search_locations]
    for folder in folders:
        if (folder / TEMPLATE_FILES[name]).is_file():
            return folder / TEMPLATE_FILES[name]
    raise InputError(f"nilearn's MNI152 template file {TEMPLATE_FILES[name]} not found in {folders[0]}")


def _downsample(volume: np.ndarray, factor: float) -> np.ndarray:
    """Resample a 1 mm volume to voxels `factor` times larger, with anti-aliasing.

    Output voxel j covers input voxels [j * factor, (j + 1) * factor), so its centre is input
    coordinate j * factor + (factor - 1) / 2 and the grid has ceil(n / factor) voxels per axis.
    Integer factors use exact block means (fast); others a Gaussian prefilter (sigma =
    (factor - 1) / 2, as skimage) and linear interpolation.
    """
    shape_out = tuple(math.ceil(n / factor) for n in volume.shape)
    if factor == round(factor):
        f = round(factor)
        padded = np.zeros(tuple(n * f for n in shape_out), dtype=np.float32)
        padded[tuple(slice(0, n) for n in volume.shape)] = volume
        blocks = padded.reshape(shape_out[0], f, shape_out[1], f, shape_out[2], f)
        return blocks.mean(axis=(1, 3, 5), dtype=np.float32)
    smooth = ndimage.gaussian_filter(volume, sigma=(factor - 1) / 2)
    coords = np.meshgrid(*[np.arange(n) * factor + (factor - 1) / 2 for n in shape_out], indexing="ij")
    return ndimage.map_coordinates(smooth, coords, order=1, mode="constant").astype(np.float32)


def load_template(voxel_size_mm: float = 2.0) -> Template:
    """Load nilearn's MNI152 2009a T1 and white- and grey-matter maps at `voxel_size_mm` isotropic.

    The template is skull-stripped (zero outside the brain) and stored as uint8; the T1 is
    scaled by 1/255 so that white matter is about 0.84 and grey matter about 0.65.

    Args:
        voxel_size_mm: voxel edge of the result, >= 1 (the template is 1 mm).

    Raises:
        InputError: if the template cannot be found.
    """
    t1_image = cast(nib.Nifti1Image, nib.load(template_path("t1")))
    wm_image = cast(nib.Nifti1Image, nib.load(template_path("wm")))
    gm_image = cast(nib.Nifti1Image, nib.load(template_path("gm")))
    # Reading the uint8 data and converting here is much faster than asking nibabel for floats.
    t1 = np.asanyarray(t1_image.dataobj).astype(np.float32) / 255.0
    wm = np.asanyarray(wm_image.dataobj).astype(np.float32) / 255.0
    gm = np.asanyarray(gm_image.dataobj).astype(np.float32) / 255.0
    # The T1 is already masked to the brain (CSF included), so its support is the brain mask.
    brain = (t1 > 0).astype(np.float32)
    factor = voxel_size_mm / float(np.linalg.norm(t1_image.affine[:3, 0]))
    affine = np.array(t1_image.affine, dtype=np.float64)
    linear = affine[:3, :3].copy()
    affine[:3, 3] = affine[:3, 3] + linear @ np.full(3, (factor - 1) / 2)
    affine[:3, :3] = linear * factor
    return Template(
        t1=_downsample(t1, factor),
        wm=_downsample(wm, factor),
        gm=_downsample(gm, factor),
        brain=_downsample(brain, factor),
        affine=affine,
        voxel_size_mm=voxel_size_mm,
    )


def _smooth_field(shape: tuple[int, ...], spacing_voxels: float, rng: np.random.Generator) -> np.ndarray:
    """Return a smooth random field of `shape`, unit standard deviation at control points.

    Independent normal values on a coarse grid of control points about `spacing_voxels`
    apart are interpolated with cubic splines, so the field has no detail finer than that.
    """
    coarse_shape = tuple(max(2, math.ceil(n / spacing_voxels) + 1) for n in shape)
    coarse = rng.standard_normal(coarse_shape)
    # Spline zooming is linear and separable, so one small matrix per axis does the same
    # as ndimage.zoom on the whole volume, several times faster.
    matrices = [_zoom_matrix(c, n) for c, n in zip(coarse_shape, shape, strict=True)]
    field = np.einsum("ia,jb,kc,abc->ijk", *matrices, coarse, optimize=True)
    return field.astype(np.float32)


def _zoom_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Cubic-spline upsampling from `n_in` to `n_out` samples as a matrix (n_out, n_in)."""
    eye = np.eye(n_in)
    columns = [ndimage.zoom(e, n_out / n_in, order=3, mode="nearest", grid_mode=True)[:n_out] for e in eye]
    return np.stack(columns, axis=1)


def _sampling_grid(shape: tuple[int, int, int], voxel_size_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Source coordinates of a random affine plus smooth elastic warp, shape (3, X, Y, Z).

    x_src = c + A (x - c) + t + d(x), with A a rotation (each angle up to 5 degrees) times a
    per-axis scale in [0.95, 1.05] about the grid centre c, t a shift up to 2 mm per axis and d
    a smooth displacement (control points 32 mm apart, 2-3 mm standard deviation).
    """
    centre = (np.array(shape) - 1) / 2
    a = rotation_matrix(np.deg2rad(rng.uniform(-5, 5, 3))) @ np.diag(rng.uniform(0.95, 1.05, 3))
    shift = rng.uniform(-2, 2, 3) / voxel_size_mm
    sigma = rng.uniform(2.0, 3.0) / voxel_size_mm
    spacing = 32.0 / voxel_size_mm
    axes = [np.arange(n, dtype=np.float32) - c for n, c in zip(shape, centre, strict=True)]
    grid = np.empty((3, *shape), dtype=np.float32)
    for i in range(3):
        # Broadcasting the affine part over the three axes avoids a (3, N) matrix product.
        grid[i] = a[i, 0] * axes[0][:, None, None] + a[i, 1] * axes[1][None, :, None] + a[i, 2] * axes[2][None, None, :]
        grid[i] += centre[i] + shift[i]
        grid[i] += sigma * _smooth_field(shape, spacing, rng)
    return grid


@dataclass(frozen=True)
class Subject:
    """One synthetic subject, all arrays of the template's shape.

    Attributes:
        t1: intensities, float32, zero outside the brain.
        lesion: lesion mask, uint8 0/1 (all zero for healthy subjects).
        brain: brain mask, uint8 0/1.
    """

    t1: np.ndarray
    lesion: np.ndarray
    brain: np.ndarray


def make_subject(template: Template, rng: np.random.Generator, *, lesion_kind: str | None) -> Subject:
    """Make one subject: deformed, contrast-varied, optionally lesioned, biased and noisy.

    Args:
        template: the resampled template (`load_template`).
        rng: source of randomness.
        lesion_kind: a `LESION_KINDS` name (`add_lesions`), or None for a healthy subject.
    """
    shape = template.t1.shape
    grid = _sampling_grid(shape, template.voxel_size_mm, rng)
    t1 = ndimage.map_coordinates(template.t1, grid, order=3, mode="constant")
    wm = ndimage.map_coordinates(template.wm, grid, order=1, mode="constant")
    brain = ndimage.map_coordinates(template.brain, grid, order=1, mode="constant") > 0.5
    t1 = np.clip(t1, 0.0, 1.0) ** np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
    lesion = np.zeros(shape, dtype=np.uint8)
    if lesion_kind is not None:
        grey = None
        if lesion_kind == "grey":
            gm = ndimage.map_coordinates(template.gm, grid, order=1, mode="constant")
            grey = float(t1[(gm > 0.5) & brain].mean())
        voxel_ml = template.voxel_size_mm**3 / 1000
        for _ in range(MAX_LESION_DRAWS):  # a lesioned subject has at least MIN_LESION_ML of lesion
            lesioned, lesion = add_lesions(t1, wm, rng, template.voxel_size_mm, brain_mask=brain, grey_intensity=grey)
            if lesion.sum() * voxel_ml >= MIN_LESION_ML:
                break
        t1 = lesioned
    bias = _smooth_field(shape, 64.0 / template.voxel_size_mm, rng)
    bias *= rng.uniform(0.10, 0.15) / max(float(np.abs(bias).max()), 1e-6)
    t1 = t1 * (1.0 + bias)
    noise_sigma = rng.uniform(0.02, 0.04) * float(t1[brain].mean())
    t1 = t1 + noise_sigma * rng.standard_normal(shape, dtype=np.float32)
    t1 = np.where(brain, np.clip(t1, 0.0, None), 0.0).astype(np.float32)
    return Subject(t1=t1, lesion=lesion, brain=brain.astype(np.uint8))


def _split_counts(n: int, fractions: tuple[float, float, float]) -> dict[Split, int]:
    """Subjects per split: test and train get at least 1 and 2 subjects, val the rest."""
    n_test = max(1, round(fractions[2] * n))
    n_val = round(fractions[1] * n)
    n_val = min(n_val, n - n_test - 2)
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def _lesioned_counts(counts: dict[Split, int], fraction: float, kinds: int = 1) -> dict[Split, int]:
    """Lesioned subjects per split, about `fraction` of each split and of the whole.

    Test (and val, where it has subjects) gets at least one lesioned subject of each of `kinds`
    lesion kinds where it has room, train at least one lesioned and one healthy; the remaining
    lesioned subjects go where the proportional share was most rounded down.
    """
    total = sum(counts.values())
    floors: dict[Split, int] = {s: math.floor(fraction * n) for s, n in counts.items()}
    val_low = min(kinds, counts["val"]) if kinds > 1 else 0
    low: dict[Split, int] = {"train": 1, "val": val_low, "test": min(kinds, counts["test"])}
    target = min(max(round(fraction * total), 2, sum(low.values())), total - 1)
    high: dict[Split, int] = {"train": counts["train"] - 1, "val": counts["val"], "test": counts["test"]}
    result = {s: min(max(floors[s], low[s]), high[s]) for s in counts}
    # Ties favour test, then val: the demo explains a held-out lesioned volume.
    ties: tuple[Split, ...] = ("test", "val", "train")
    by_remainder = sorted(ties, key=lambda s: -(fraction * counts[s] - floors[s]))
    while sum(result.values()) < target:
        split = next(s for s in by_remainder if result[s] < high[s])
        result[split] += 1
        by_remainder.remove(split)
        by_remainder.append(split)
    return result


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    image = nib.Nifti1Image(array, affine)
    # Subjects are small variations of the template, so its space stays "aligned" (code 2).
    image.set_sform(affine, code=2)
    image.set_qform(affine, code=2)
    image.header.set_xyzt_units(xyz="mm")
    return atomic_write(path, lambda tmp: nib.save(image, tmp), suffix=".nii.gz")  # a full disk: one line


def build_demo_dataset(
    out_dir: Path,
    *,
    n_subjects: int = 24,
    lesioned_fraction: float = 0.5,
    voxel_size_mm: float = 2.0,
    splits: tuple[float, float, float] = (0.75, 0.125, 0.125),
    seed: int = 0,
    lesion_kinds: tuple[str, ...] = ("bright",),
) -> Path:
    """Build the demo dataset from nilearn's MNI152 template and write its manifest.

    Subjects are split by subject with the given train/val/test fractions (test, and val where
    it has room, hold a lesioned subject of each lesion kind; train holds lesioned and healthy
    subjects); within a split, lesioned subjects take the kinds in turn. Each subject draws its
    own random stream from `seed`, so the whole dataset is a function of the arguments. Files
    written in `out_dir`, per subject: ``sub-XXX_t1.nii.gz`` (float32), ``sub-XXX_lesion.nii.gz``
    and ``sub-XXX_brainmask.nii.gz`` (uint8 0/1), all on the same grid and affine (the
    template's, with `voxel_size_mm` voxels); then ``manifest.csv`` (the mask column points at
    the lesion masks, all zero for healthy subjects; `label` is left empty) and
    ``lesion_kinds.csv`` (subject, split, lesion kind or 'none', see `read_lesion_kinds`).

    Args:
        out_dir: output folder, created if needed; existing files of the same name are replaced.
        n_subjects: number of subjects, >= 4.
        lesioned_fraction: fraction of subjects with lesions, in (0, 1).
        voxel_size_mm: isotropic voxel edge, >= 1 (2 mm gives 99 x 117 x 95 voxels).
        splits: train, val and test fractions of subjects, non-negative, summing to 1.
        seed: seed of all randomness.
        lesion_kinds: `data.lesions.LESION_KINDS` names, in the order lesioned subjects take them.

    Returns:
        The manifest path, ``out_dir / "manifest.csv"``.

    Raises:
        ConfigError: if an argument is out of range.
        InputError: if the nilearn template cannot be found.
    """
    if n_subjects < 4:
        raise ConfigError(f"n_subjects must be >= 4, got {n_subjects}")
    if not 0.0 < lesioned_fraction < 1.0:
        raise ConfigError(f"lesioned_fraction must be in (0, 1), got {lesioned_fraction}")
    if voxel_size_mm < 1.0:
        raise ConfigError(f"voxel_size_mm must be >= 1 (the template is 1 mm), got {voxel_size_mm}")
    if len(splits) != 3 or min(splits) < 0 or not math.isclose(sum(splits), 1.0, abs_tol=1e-6):
        raise ConfigError(f"splits must be 3 non-negative fractions summing to 1, got {splits}")
    unknown = [k for k in lesion_kinds if k not in LESION_KINDS]
    if not lesion_kinds or unknown:
        raise ConfigError(f"lesion_kinds must be among {', '.join(LESION_KINDS)}, got {list(lesion_kinds)}")
    template = load_template(voxel_size_mm)
    out_dir.mkdir(parents=True, exist_ok=True)

    split_rng, *subject_seeds = np.random.SeedSequence(seed).spawn(n_subjects + 1)
    counts = _split_counts(n_subjects, splits)
    lesioned_counts = _lesioned_counts(counts, lesioned_fraction, len(lesion_kinds))
    order = np.random.default_rng(split_rng).permutation(n_subjects)
    assignment: dict[int, tuple[Split, str | None]] = {}
    start = 0
    for split in SPLITS:
        members = order[start : start + counts[split]]
        start += counts[split]
        for rank, index in enumerate(members):
            kind = lesion_kinds[rank % len(lesion_kinds)] if rank < lesioned_counts[split] else None
            assignment[int(index)] = (split, kind)

    rows, kinds = [], []
    for index in range(n_subjects):
        split, kind = assignment[index]
        name = f"sub-{index + 1:03d}"
        subject = make_subject(template, np.random.default_rng(subject_seeds[index]), lesion_kind=kind)
        kinds.append(f"{name},{split},{kind or 'none'}\n")
        rows.append(
            ManifestRow(
                subject=name,
                split=split,
                images=(_save(subject.t1, template.affine, out_dir / f"{name}_t1.nii.gz"),),
                mask=_save(subject.lesion, template.affine, out_dir / f"{name}_lesion.nii.gz"),
                brainmask=_save(subject.brain, template.affine, out_dir / f"{name}_brainmask.nii.gz"),
            )
        )
    atomic_write_bytes(("subject,split,lesion_kind\n" + "".join(kinds)).encode(), out_dir / KINDS_FILE)
    return write_manifest(rows, out_dir / "manifest.csv")


KINDS_FILE = "lesion_kinds.csv"
MIN_LESION_ML = 1.0
"""Lesions are drawn again (up to MAX_LESION_DRAWS times) until a lesioned subject has this much."""
MAX_LESION_DRAWS = 5


def read_lesion_kinds(manifest: Path) -> dict[str, str]:
    """subject -> lesion kind ('none' for healthy) of a demo dataset, from the file beside its manifest."""
    path = manifest.parent / KINDS_FILE
    if not path.is_file():
        raise InputError(f"{path}: not found (is {manifest} a demo dataset?)")
    lines = path.read_text().splitlines()[1:]
    return {subject: kind for subject, _, kind in (line.split(",") for line in lines if line.strip())}
