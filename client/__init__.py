"""Site side: the site worker that alone reads a hospital's data (and the steps it runs), the relay ClientApp the
coordinator's app bundle brings, and a hospital's own commands' code (predict, adapt, audit)."""
