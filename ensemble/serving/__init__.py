"""The selected ensemble as a product: registered, served, run on images, scored and submitted.

:mod:`registry` packs and registers it in MLflow, :mod:`governance` decides which version is the
champion, :mod:`model` is the ``mlflow.pyfunc`` model (loaded through :mod:`from_code`) that
reads :mod:`inputs`, :mod:`predict` runs it over many images, :mod:`evaluate` scores predictions
against cell truth and :mod:`submission` writes the Kaggle file.
"""
