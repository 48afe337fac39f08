"""The built-in operations, one module each; importing this package registers them.

Each module declares its config section, phases, experiment, FIP paths and sweep trials
(`fipray.operation.Operation`). Their baselines live in `fipray.baselines`.
"""

from fipray.ops import compose, continual, ensemble, robust, sparsify, spectrum  # noqa: F401  (registers them)
from fipray.ops.continual import TaskTensors, fip_continual_phases
from fipray.ops.ensemble import select_members, undirected_phase
from fipray.ops.sparsify import fip_sparsify_phases, magnitude_masks, projection_loss

__all__ = ["TaskTensors", "fip_continual_phases", "fip_sparsify_phases", "magnitude_masks",
           "projection_loss", "undirected_phase", "select_members"]
