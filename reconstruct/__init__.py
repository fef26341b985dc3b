"""Geometry: SfM, metric scale, orientation, measurement, design merge and rendering.

Plain functions over typed inputs; knows nothing of Ray or HTTP.
"""
