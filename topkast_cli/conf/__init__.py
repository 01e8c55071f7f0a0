"""Hydra config tree of topkast (shipped inside the package)."""
