"""The zoo: what to train, as data.

- :mod:`ensemble.zoo.spec`: model specs and zoos (``ensemble/zoos/*.yaml``), checked as they are read.
- :mod:`ensemble.zoo.search_space`: what a sweep may change in a spec (``ensemble/search_spaces/*.yaml``).
"""

from ensemble.zoo.spec import (ZOO_DIR, IntegritySettings, ModelSpec, Placement, RelabelSettings, SpecError,
                               TrainSettings, Zoo, load_zoo, spec_params, zoo_with)

__all__ = ["ZOO_DIR", "IntegritySettings", "ModelSpec", "Placement", "RelabelSettings", "SpecError",
           "TrainSettings", "Zoo", "load_zoo", "spec_params", "zoo_with"]
