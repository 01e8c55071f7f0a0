"""The commands of the `topkast` console script, each a thin layer over `launch` and `run`."""
