"""Filesystem and archive readers that turn bytes into ``Entry`` trees (tar layers first)."""
