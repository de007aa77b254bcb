"""Datasets lorakit ships: the embedded default, built from the installed Python standard library."""
