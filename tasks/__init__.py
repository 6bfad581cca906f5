"""Tasks: detection and segmentation models assembled from backbones and heads, with their data."""
