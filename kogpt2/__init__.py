"""kogpt2-pipeline: Korean GPT-2 preprocessing, training and bulk generation.

Importing the package sets ``TF_USE_LEGACY_KERAS=1`` before TensorFlow is
imported anywhere (see :mod:`kogpt2.tf_setup`).
"""

from kogpt2 import tf_setup as _tf_setup  # noqa: F401  (must run first)

__version__ = "0.1.0"
