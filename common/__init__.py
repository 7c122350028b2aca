"""What both sides use: the config, the data contract, the networks, training, metrics, bundles and the message
contract (Flower's records, no Flower app)."""

import os as _os
import warnings as _warnings

if not _os.environ.get("MOME_DEBUG"):
    # MONAI's own use of torch.jit.interface, which torch deprecates: a notice for MONAI, not for a site's console
    # (here, before any of this package imports MONAI, so that every process that runs mome code has it, Ray's
    # simulation actors included)
    _warnings.filterwarnings("ignore", message="`torch.jit.interface` is deprecated", category=DeprecationWarning)
