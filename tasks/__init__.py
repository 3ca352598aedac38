"""Pipeline stages: one module per stage, a body on the stage runner (tasks/stage.py)."""

import logging

# The stages report progress at INFO (a rewriter loaded, a shard done). Prefect
# attaches its handlers to this package's logger (PREFECT_LOGGING_EXTRA_LOGGERS),
# so INFO must pass this logger for those lines to reach a run's logs in the UI.
logging.getLogger(__name__).setLevel(logging.INFO)
