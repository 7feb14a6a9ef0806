"""Running transfers: the worker that executes one claimed transfer, and the loop runner."""
