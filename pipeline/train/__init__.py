"""Pretraining: the loop (`loop.py`), its data loader, checkpoints, parallel wrappers and watchdog."""
