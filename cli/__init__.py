"""The `mome` command, one module per kind of user: hospital, coordinator, developer."""
