"""`python -m pipeline.training STAGE [--config JOB.yaml]`: see `pipeline.training.cli`."""

from pipeline.training.cli import main

main()
