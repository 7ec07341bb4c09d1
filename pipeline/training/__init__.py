"""What a model is and how one step learns: open_clip models and checkpoints, losses, negatives
strategies (in-batch, grad cache, memory bank), samplers, the image cache and the Lightning module."""
