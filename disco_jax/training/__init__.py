"""Training: the trainer loop, the two stages (tasks), losses, optimizer, mesh, checkpoints, logs."""
