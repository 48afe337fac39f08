"""fipray: functionally invariant paths (Raghavan et al., Nature Machine Intelligence 2024).

Importing fipray never imports Ray; `fipray.ray` is the only module that does.
"""

from fipray.config import Config, ConfigError, load_config
from fipray.path import PathResult, Phase, run_path

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "load_config", "Phase", "PathResult", "run_path", "__version__"]
