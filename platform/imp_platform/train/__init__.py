"""AGD pretraining on Ray Train V2: sampler, worker loop, trainer, checkpoints, metrics."""
