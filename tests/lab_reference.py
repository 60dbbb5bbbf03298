"""Reference sRGB -> CIE Lab values that both Lab implementations are tested against: the jnp/numpy
one of `ops.colour` (model, metrics, colorize) and the TF-ops one of `data.pipeline` (tf.data).

Computed once in float64 from the CIE definitions with OpenCV's float constants (its sRGB -> XYZ
matrix and D65 white), independently of either implementation; 4 decimals.
"""
import numpy as np

RGB = np.array([[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0.5],
                [0.02, 0.03, 0.01], [0.8, 0.6, 0.2], [0.1, 0.4, 0.7], [0.95, 0.9, 0.1]])
LAB = np.array([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.2406, 80.0942, 67.2015],
                [87.7351, -86.1813, 83.1775], [32.2957, 79.1870, -107.8617],
                [53.3890, 0.0, 0.0], [1.8478, -1.3760, 1.6952], [66.4142, 9.4984, 57.9422],
                [42.6855, 6.2848, -46.8776], [89.5393, -14.2895, 85.9170]])
# The table's rounding is up to 5e-5; float32 arithmetic on values up to ~110 adds ~1e-5.
ATOL = 2e-4
