"""Class labels of the noise-aware classifier, as named constants.

The original code mixes up 0 and 1; here every label that enters the program goes through
`check_labels`, and guidance always targets `HEALTHY` by name.
"""

from collections.abc import Iterable

import numpy as np

from anomaly_diffusion.errors import InputError

HEALTHY = 0
PATHOLOGICAL = 1
LABEL_NAMES = {HEALTHY: "healthy", PATHOLOGICAL: "pathological"}
NULL_LABEL = 2
"""The "no label" class of a classifier-free-guidance denoiser eps(x_t, t, null) (Ho & Salimans 2022)."""
NUM_CLASS_EMBEDS = 3
"""Class embeddings of a label-conditional UNet: HEALTHY, PATHOLOGICAL and NULL_LABEL."""


def check_labels(labels: Iterable[int] | np.ndarray, source: str) -> np.ndarray:
    """Return labels as an int64 array, refusing anything but HEALTHY and PATHOLOGICAL.

    Args:
        labels: label values, shape (N,).
        source: where the labels come from, for the error message.

    Raises:
        InputError: if a label is not 0 (healthy) or 1 (pathological).
    """
    array = np.asarray(list(labels) if not isinstance(labels, np.ndarray) else labels)
    if array.size and not np.isin(array, list(LABEL_NAMES)).all():
        bad = sorted(set(np.unique(array).tolist()) - set(LABEL_NAMES))
        raise InputError(f"{source}: labels must be {HEALTHY} (healthy) or {PATHOLOGICAL} (pathological), found {bad}")
    return array.astype(np.int64)
