"""Variational families: one module per story, named like the story's module."""
