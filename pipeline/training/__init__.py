"""Training of inversa's own models.

`loop` is the loop every trained model shares (seeding, the step/time budget, optimisation, resuming,
the metrics record); each trained model adds one module (`world_vae`, `world_clip`, `world_unet`,
`world_oracle` for the shapes world). `fingerprints` (standard library only) hashes weight files.

    python -m pipeline.training {vae|vae-decoder|clip|clip-guide|unet|vae-broad|oracle|all|card} [--config JOB.yaml]

This package's `__init__` imports nothing, so light modules (the model card) can import
`pipeline.training.fingerprints` without loading torch.
"""
