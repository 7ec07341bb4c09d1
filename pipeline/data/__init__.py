"""Data parts: the input contract, date partitions, query text, position bias, near-duplicate
hashing, grouping and the leak audit. Importable without MLflow, Airflow or a run folder."""
