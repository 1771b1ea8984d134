"""Apache Beam pipelines: corpus preprocessing and bulk generation."""

from kogpt2 import tf_setup as _tf_setup  # noqa: F401  (TF_USE_LEGACY_KERAS before TF)
