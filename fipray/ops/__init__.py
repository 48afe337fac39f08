"""The built-in operations, one module each; importing this package registers them.

Each module declares its config section, phases, experiment, FIP paths and sweep trials
(`fipray.operation.Operation`). Their baselines live in `fipray.baselines`.
"""

from fipray.ops import compose, continual, ensemble, robust, sparsify, spectrum  # noqa: F401  (registers them)
from fipray.ops.continual import fip_continual_phases
from fipray.ops.ensemble import undirected_phase
from fipray.ops.sparsify import fip_sparsify_phases

__all__ = ["fip_continual_phases", "fip_sparsify_phases", "undirected_phase"]
