"""dicomvault: backup and export engine for DICOM image databases."""
from importlib.metadata import PackageNotFoundError, version

from .engine import hookimpl

try:
    __version__ = version("dicomvault")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

__all__ = ["__version__", "hookimpl"]
