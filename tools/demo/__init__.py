"""The bundled demo model, trained here from nothing: ``python -m tools.demo build`` (see recipe.py)."""
