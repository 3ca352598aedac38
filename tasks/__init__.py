"""Pipeline stages: one module per stage, a plain core plus a thin Prefect task."""
