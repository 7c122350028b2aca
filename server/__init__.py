"""Coordinator side: the MoME ServerApp, update checks, aggregation, checkpoints and reports."""
