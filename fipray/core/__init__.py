"""Pure FIP math on parameter dicts and plain callables. Never imports Ray, does no I/O."""

from fipray.core.distances import DISTANCES, bhattacharyya, get_distance, kl, l2
from fipray.core.metric import metric_norm, metric_vp
from fipray.core.step import Anchor, StepOutput, penalty_step

__all__ = [
    "DISTANCES", "get_distance", "bhattacharyya", "kl", "l2",
    "metric_vp", "metric_norm",
    "Anchor", "StepOutput", "penalty_step",
]
