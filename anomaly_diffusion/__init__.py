"""anomaly_diffusion: weakly supervised anomaly detection in medical scans with diffusion models.

Implements Wolleb et al., "Diffusion Models for Medical Anomaly Detection" (MICCAI 2022):
a DDPM (Ho et al. 2020) encodes a scan with deterministic DDIM (Song et al. 2021) and decodes it
with classifier guidance (Dhariwal & Nichol 2021) towards the healthy class; the difference
between the scan and its healthy counterfactual is the anomaly map.
"""

__version__ = "0.1.0"
