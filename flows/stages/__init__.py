"""One module per stage: read upstream tables, call components, write Parquet into `out`.

No Prefect and no MLflow here (`flows/pipeline.py` wraps the stages in tasks, caching and tracking), and
no config object: a stage takes the task family and the plain settings that `flows/families.py` built,
the same values `flows/plan.py` hashes. A stage's cache key covers the source of its own module and of
every project module it imports (`flows.versions`), so each module imports only what the stage runs.
"""
