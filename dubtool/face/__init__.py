"""Faces: the 131 landmark indices, detectors, crops and drawing."""
