"""The code file of the logged pyfunc model (MLflow's "models from code"): MLflow copies this file into the
model and runs it to get the model object. Not imported by the project; the model itself is flows/model.py."""
from mlflow.models import set_model

from flows.model import MetaLearnedStart

set_model(MetaLearnedStart())
