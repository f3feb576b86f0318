"""The bundled demo model, trained here from nothing: ``python -m vlm.demo build`` (see recipe.py)."""
