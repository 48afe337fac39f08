"""Pure FIP math on parameter dicts and plain callables. Never imports Ray, does no I/O."""

from fipray.core.distances import DISTANCES, bhattacharyya, get_distance, kl, l2
from fipray.core.metric import metric_norm, metric_operator, metric_vp
from fipray.core.spectrum import lanczos, slq, top_eigen
from fipray.core.step import Anchor, StepOutput, metric_step, penalty_step, trust_region_step

__all__ = [
    "DISTANCES", "get_distance", "bhattacharyya", "kl", "l2",
    "metric_vp", "metric_norm",
    "Anchor", "StepOutput", "penalty_step",
    "metric_operator", "metric_step", "trust_region_step", "lanczos", "top_eigen", "slq",
]
