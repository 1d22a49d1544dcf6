"""The healthy counterfactual of a scan: DDIM-encode without guidance, decode with guidance towards healthy.

    x_L = ddim_encode(eps_theta, x, L)                                         (no guidance)
    x_healthy = ddim_decode(eps_hat, x_L, L),  eps_hat = eps - s sqrt(1 - alpha_bar_t) grad log p(healthy | x_t)
                  or, classifier-free:      eps_hat = eps(null) + w (eps(healthy) - eps(null))
    anomaly map = sum_c |x_c - x_healthy_c|                                     (Wolleb 2022)
                  or sum_c max(x_c - x_healthy_c, 0)                (`residual: positive`, bright lesions)

The encoding (`ENCODINGS`: DDIM inversion, or forward noising with white, coarse or simplex noise)
and the decoding (`DECODINGS`: DDIM, THOR's harmonised DDIM, or Dif-fuse's masked lockstep DDIM) are
named choices. The map compares the counterfactual with the input, or (`pairing: reconstruction`)
with the plain DDIM reconstruction of the same x_L, so the reconstruction error both share cancels;
a classifier gradient may be low-passed on the image grid (`smooth`, no lattice). An ensemble
(`explain_ensemble`) averages the maps of several levels or draws; their spread is its uncertainty.

Every option lives in one immutable `ExplainSettings`, made and checked once by
`explain_settings`. Slices are processed in batches on the model's device; the map is computed at
model resolution in normalised units and mapped back onto the input's voxel grid (`scans.py`).

Modules, one job each: `settings` (ExplainSettings, checked once), `denoisers` (the networks as
eps_theta and eps_hat), `slices` (encode, decode, mask, p(healthy), map on model-size slices),
`cache` (SliceDecodings, shared by explain, ensembles and evaluate), `scan` (a scan or an ensemble).
The encodings and decodings themselves are pure maths in `diffusion/encoding.py` and `diffusion/decoding.py`.
"""

from anomaly_diffusion.counterfactual.cache import SliceDecodings
from anomaly_diffusion.counterfactual.scan import (
    EnsembleExplanation,
    ScanEnsemble,
    explain_ensemble,
    explain_scan,
    explain_scan_ensemble,
    explain_slices,
)
from anomaly_diffusion.counterfactual.settings import ExplainSettings, explain_settings

__all__ = [
    "EnsembleExplanation",
    "ExplainSettings",
    "ScanEnsemble",
    "SliceDecodings",
    "explain_ensemble",
    "explain_scan",
    "explain_scan_ensemble",
    "explain_settings",
    "explain_slices",
]
