"""Colorizing photos with a trained model: the Python API and the command line."""
