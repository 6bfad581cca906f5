"""Tasks: detection, segmentation and classification assembled from backbones and heads, with their data,
evaluation, training engine and export.

Layers, top to bottom (imports point down only; ``lint-imports`` checks it): ``registry`` (the tasks by
name), ``engine`` and ``deploy``, the three tasks (``detection``, ``segmentation``, ``classification``:
independent of each other), ``data``, ``config``, then ``evaluation``, ``modeling`` and ``cli``.
"""
