"""Progress lines of Flower's child processes (ServerApp, deployed ClientApps), which start with no logging set up."""

from __future__ import annotations

import logging
import sys


def show_progress() -> None:
    """Send the `mome` loggers' INFO lines to stderr, which Flower streams (`flwr run --stream`, the SuperNode's
    log), unless the process already set up logging."""
    logger = logging.getLogger("mome")
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
