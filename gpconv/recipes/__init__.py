"""Recipes: a whole pipeline (model -> surgery -> data -> training -> evaluation -> outputs) in
one YAML file. :mod:`.schema` is the format, :mod:`.runner` runs it, ``data/`` holds the bundled ones."""

from .runner import RecipeResult, build_data, build_model, model_config, plan, run_recipe, surgery_config, train_config
from .schema import (MISSING, TEACHER_IS_MODEL, TOP, apply_overrides, check_complete, dump, find_recipe, list_recipes,
                     load_recipe, missing_keys, parse_overrides, parse_value, read_yaml, recipe_dirs, resolve)

__all__ = [
    "MISSING", "RecipeResult", "TEACHER_IS_MODEL", "TOP", "apply_overrides", "build_data", "build_model", "check_complete",
    "dump", "find_recipe", "list_recipes", "load_recipe", "missing_keys", "model_config", "parse_overrides",
    "parse_value", "plan", "read_yaml", "recipe_dirs", "resolve", "run_recipe", "surgery_config", "train_config",
]
