"""Secondary objectives, one file each, all running through the same FIP phase and loop."""

from fipray.ops.continual import TaskTensors, fip_continual_phases
from fipray.ops.sparsify import fip_sparsify_phases, magnitude_masks, projection_loss
from fipray.ops.undirected import select_members, undirected_phase

__all__ = ["TaskTensors", "fip_continual_phases", "fip_sparsify_phases", "magnitude_masks",
           "projection_loss", "undirected_phase", "select_members"]
