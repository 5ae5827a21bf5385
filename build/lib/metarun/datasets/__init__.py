"""Datasets: in-memory class-indexed image splits and synthetic task families."""
