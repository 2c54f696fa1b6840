"""The base layer: what every other layer uses (atomic writes, progress events); standard library only."""
