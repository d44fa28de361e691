"""Training: `python -m wrinklefree.train` (Hydra entry), the Trainer loop, optimizers and schedules,
checkpoints, distributed wrapping and logging (DESIGN.md section 5)."""
