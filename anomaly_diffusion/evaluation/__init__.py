"""Evaluation of anomaly maps against lesion masks: our method and baselines in one harness.

- `methods`: the detectors compared and their command-line grammar (`guided`, `paper`, `NAME:L=..`);
- `scoring`: every method's scores on the same voxels of one volume, through explain's pipeline;
- `results`: the metrics of each method on a split (pooled, per volume, by lesion size, bootstrap);
- `report`: markdown tables and flat MLflow metrics.
"""
