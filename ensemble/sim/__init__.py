"""The simulator: HPA-like images with the true label of every cell, and synthetic OOF predictions.

It stands in for the HPA data and for trained zoos where neither can be had: :mod:`images`
writes datasets in the Kaggle layout (with ``truth/`` cell labels unless told to write only
what the competition gives), :mod:`layout` places cells, :mod:`render` paints their channels,
and :mod:`oof` draws OOF tables of model families with a known block structure for tests and
selection benchmarks.
"""
