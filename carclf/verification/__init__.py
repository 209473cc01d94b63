"""Checking a model folder before anything loads it: manifest digests and signature."""
