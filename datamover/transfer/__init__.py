"""Moving trees: push (local tree to a new version), stage (version to local tree), verify."""
