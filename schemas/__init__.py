"""The machine-readable specs, installed as the package data of ``kogpt2.schema_files``.

Read them with :mod:`kogpt2.schemas` (``importlib.resources``), never by path.
"""
