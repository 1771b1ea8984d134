"""Names of the files that make an output folder self-describing: one name, one meaning each.

- :data:`INFO_FILE` ``info.json``: what a pipeline's output holds (counts, provenance); shards
  and generation folders have one.
- :data:`COMPLETED_FILE` ``COMPLETED``: written last, when the folder is finished.
- :data:`RUN_FILE` ``run.json``: a pipeline run's signature (inputs and flags), so a rerun
  knows whether the folder is its own.
- :data:`MODEL_INFO_FILE` ``kogpt2.json``: a model folder's provenance (data and tokenizer
  fingerprints, steps, versions).
"""

INFO_FILE = "info.json"
COMPLETED_FILE = "COMPLETED"
RUN_FILE = "run.json"
MODEL_INFO_FILE = "kogpt2.json"
