from saisa.training.recipe import load_recipe
from saisa.training.run import run_training
from saisa.training.stages import configure_stage, expand_shared_projector

__all__ = ["configure_stage", "expand_shared_projector", "load_recipe", "run_training"]
