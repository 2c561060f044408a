"""The staged, cached dubbing pipeline."""
