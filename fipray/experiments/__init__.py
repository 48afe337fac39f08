"""Experiments: an operation compared with its baselines over seeds, written to an output folder.

`run_experiment(cfg, out_dir)` is what `fipray continual|sparsify|ensemble` calls.
"""

from fipray.experiments._common import run_experiment

__all__ = ["run_experiment"]
