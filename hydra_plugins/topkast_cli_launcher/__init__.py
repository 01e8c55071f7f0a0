"""topkast-cli's Hydra launcher plugin: `hydra/launcher=slurm_ddp` (see slurm_ddp.py)."""
