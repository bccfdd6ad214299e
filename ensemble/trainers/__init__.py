"""Training: Ray Train jobs per (model, fold), Ray Tune sweeps, the zoo and CRA relabelling."""
