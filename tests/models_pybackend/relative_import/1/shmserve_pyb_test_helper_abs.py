"""Imported by entry.py as a top-level module (the version folder is on sys.path)."""

OFFSET = 7
