"""Shared core of MoME: data contract, models, training, metrics and serialisation (no Flower)."""
