-- Runs once, when the postgres volume is first initialised (docker-entrypoint-initdb.d):
-- the MLflow tracking store gets its own database beside KD Lab's (POSTGRES_DB=kdlab),
-- owned by the same role.
CREATE DATABASE mlflow OWNER kdlab;
