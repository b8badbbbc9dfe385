"""Optimisation on a story's potential: its mode (MAP, MLE), and the lasso's exact zeros."""
