"""GeAR model library (no Prefect import)."""
