"""The pyfunc flavor's models-from-code entry: MLflow runs this file to build the model at load time
(mlflow.pyfunc.log_model(python_model=<this file>)), so no Python object is pickled into the model."""

import mlflow

from xsam.model.pyfunc import XSAMModel

mlflow.models.set_model(XSAMModel())
