"""The learning layer: the network, its losses, the one training loop, inference and models (torch)."""
