"""Synthetic multi-site federations of multimodal brain-MRI-like data for testing and demos."""
