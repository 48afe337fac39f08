"""Evaluation following PROTOCOLS.md: continual-learning metrics, robustness, sparsity, diversity.

torchattacks is imported only when an attack runs, so importing this package stays light.
"""

from fipray.eval.attacks import fgsm_attack, pgd_attack
from fipray.eval.continual import cl_metrics, task_accuracy
from fipray.eval.diversity import coherence, default_layers, pairwise_disagreement, representation_diversity
from fipray.eval.predict import input_gradients
from fipray.eval.robustness import robustness_curve, sanity_flags
from fipray.eval.sparsity import counted_parameters, sparsity, sparsity_report

__all__ = [
    "cl_metrics",
    "coherence",
    "counted_parameters",
    "default_layers",
    "fgsm_attack",
    "input_gradients",
    "pairwise_disagreement",
    "pgd_attack",
    "representation_diversity",
    "robustness_curve",
    "sanity_flags",
    "sparsity",
    "sparsity_report",
    "task_accuracy",
]
