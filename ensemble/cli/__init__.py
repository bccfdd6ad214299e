"""The ``ensemble`` command line: :mod:`main` (the pipeline's steps), :mod:`product` (register,
models, predict, evaluate) and :mod:`demo`."""
