"""Importers turn a model file or folder into the edgeq IR (graph + lazy weights)."""
