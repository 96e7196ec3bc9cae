"""lsst-prod: data-release production in the style of Rubin/LSST."""

__version__ = "0.1.0"
