"""Training: the engine (`engine.py`) that pretraining (`pretrain.py`) and post-training share, its data
loader, checkpoints, parallel wrappers, watchdog and process lifecycle."""
