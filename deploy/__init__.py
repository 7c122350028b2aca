"""Deployment on Flower's deployment engine: topology, certificates, compose file, local processes."""
