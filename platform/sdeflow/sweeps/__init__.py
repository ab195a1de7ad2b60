"""Ablations and sweep grids: expansion, launchers (sequential, local, SLURM), job state and the paired
summary."""
