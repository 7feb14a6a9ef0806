"""Pure types and rules, no I/O: namespace mapping, paths, manifest entries, version ids."""
