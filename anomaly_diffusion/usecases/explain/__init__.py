"""`adiff explain`: one scan's healthy counterfactual and anomaly map, written in its space and tracked.

Split by job: `explainer` (options, checked once; the model loaded once), `compute` (scan + model +
settings -> maps and metrics, nothing written), `write` (NIfTI, montage, JSON, DICOM), `review`
(the per-slice review images), `params` (what the run is filed under), `track` (the MLflow run), and
`study` (one request going down once: read and check, compute, write, track).
"""

from anomaly_diffusion.usecases.explain.compute import StudyResult, compute_study, peak_slice
from anomaly_diffusion.usecases.explain.explainer import (
    Explainer,
    ExplainOptions,
    ExplainRequest,
    load_explainer,
    parse_levels,
)
from anomaly_diffusion.usecases.explain.params import counterfactual_params, explain_params
from anomaly_diffusion.usecases.explain.review import REVIEW_SLICES, StudyReview, review_selection
from anomaly_diffusion.usecases.explain.study import ExplainOutcome, StudyExplanation, explain_study, run_explain
from anomaly_diffusion.usecases.explain.track import REVIEW_KEYS, track_study

__all__ = [
    "REVIEW_KEYS",
    "REVIEW_SLICES",
    "ExplainOptions",
    "ExplainOutcome",
    "ExplainRequest",
    "Explainer",
    "StudyExplanation",
    "StudyResult",
    "StudyReview",
    "compute_study",
    "counterfactual_params",
    "explain_params",
    "explain_study",
    "load_explainer",
    "parse_levels",
    "peak_slice",
    "review_selection",
    "run_explain",
    "track_study",
]
