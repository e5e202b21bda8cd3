"""Continued training of compressed models: objective, masks and fake quantization,
sharding rules, the jitted step, checkpoints, logs, and the `trainer.train` entry point."""
