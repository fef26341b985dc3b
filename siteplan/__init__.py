"""Siteplan: site photos in, private metric 3D plans out."""

__version__ = "0.1.0"
# Bumped whenever a stage's output for the same input changes; results are keyed by it.
PIPELINE_VERSION = "2026.11.1"
