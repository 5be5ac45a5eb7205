"""`python -m pipeline.world.train STAGE [--config jobs/train_shapes_world.yaml]`: the shapes world's
training command, kept under this name; the code lives in `pipeline.training` (see `pipeline.training.cli`).
"""

from pipeline.training.cli import main

if __name__ == "__main__":
    main()
