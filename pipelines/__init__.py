"""Apache Beam pipelines: corpus preprocessing and bulk generation."""

import logging as _logging

from kogpt2 import tf_setup as _tf_setup  # noqa: F401  (TF_USE_LEGACY_KERAS before TF)


class _DropImportNoise(_logging.Filter):
    """Drop Beam's import-time notice about optional GCP clients (``--verbose`` keeps it)."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return _tf_setup._verbose() or "apitools not found" not in record.getMessage()


_logging.getLogger().addFilter(_DropImportNoise())
