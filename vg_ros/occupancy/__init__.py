"""Occupancy from surround cameras: TPVFormer model, pipeline, training, metrics (see docs/occupancy.md)."""
