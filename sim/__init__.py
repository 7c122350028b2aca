"""The developer's federation on one machine: synthetic multi-site data, Flower's simulation engine, the
non-federated baselines and `mome bench`."""
