"""Prefect flows: one recipe, all recipes, and their scheduled deployments."""
