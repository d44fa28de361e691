"""The Hydra configuration tree of `python -m wrinklefree.train` (installed as wrinklefree.configs)."""
