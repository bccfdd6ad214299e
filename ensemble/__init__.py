"""ensemble: train many deep networks on single-cell HPA microscopy and pick a small, diverse ensemble."""

__version__ = "0.1.0"

NUM_CLASSES = 19
