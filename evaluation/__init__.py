"""Helpers of eval_dense.py: segmentation data, detection and instance segmentation, and weights in and out."""
