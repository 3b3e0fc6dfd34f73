"""Disk image formats: each maps a file's layout onto the ``Disk`` block-status model."""
