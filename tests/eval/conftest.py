"""The evaluation tests' MLflow tracking server is the session fixture `mlflow_server` of tests/conftest.py
(shared with the training tests)."""
