"""dubtool: visual dubbing with landmark-guided latent diffusion."""

from dubtool.api import LandmarksResult, cache_clean, cache_list, dub, landmarks
from dubtool.errors import DubtoolError

__version__ = "0.1.0"
__all__ = ["DubtoolError", "LandmarksResult", "cache_clean", "cache_list", "dub", "landmarks"]
