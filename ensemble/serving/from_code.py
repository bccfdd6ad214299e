"""The code MLflow stores as the registered ensemble's model ("models from code").

MLflow runs this file when it loads the model (after putting the model's own copy of this
package on ``sys.path``, its ``code_paths``), so nothing of the model is a pickle: the weights,
the spec and the preprocessing are artifacts that :meth:`EnsembleModel.load_context` reads.
"""

import mlflow

from ensemble.serving.model import EnsembleModel

mlflow.models.set_model(EnsembleModel())
