"""The jobs layer: job folders, the worker that runs one, the client and the HTTP service that start them."""
