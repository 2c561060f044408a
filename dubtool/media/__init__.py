"""Decoding and encoding media through ffmpeg."""
