"""Data: the Kaggle/HPA reader, the simulator, segmentation, the cell store, folds and datasets."""
