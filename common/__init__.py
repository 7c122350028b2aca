"""What both sides use: the config, the data contract, the networks, training, metrics, bundles and the message
contract (Flower's records, no Flower app)."""
