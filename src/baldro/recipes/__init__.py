"""Recipes: a YAML recipe typed by its schema, and the runs it makes (finetune, unlearn, eval, attack, the demo)."""
