"""CFR-SAM: SAM-based nuclei instance segmentation and classification (model, checkpoints, export)."""

__version__ = "0.1.0"

from .build import build_cfr_sam  # noqa: E402
from .configs import CONFIG_NAMES, CFRSAMConfig, ConfigError, get_config, make_config  # noqa: E402

__all__ = ["__version__", "build_cfr_sam", "CONFIG_NAMES", "CFRSAMConfig", "ConfigError", "get_config", "make_config"]
