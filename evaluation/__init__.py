"""Helpers of eval_dense.py: segmentation data (seg_data), pictures, detection (detection: COCO and the
synthetic scenes with an FPN, VOC07+12 with C4; voc: VOC data and metric), image classification
(classification: k-NN and linear), and weights in and out (weights)."""
