"""What export and serving agree on: the models file and server settings, the manifest of checked artifacts,
and the domain errors. Imports nothing of ours and no heavy framework (pydantic and PyYAML only)."""
