"""Recipes for reference models: the shipped defaults, synthetic models for tests, the trained digits CNN, HF folders."""
