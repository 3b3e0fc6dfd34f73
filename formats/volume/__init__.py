"""Partition tables: MBR (with extended/logical partitions) and GPT, read and written.

``table.read_partitions`` finds and reads a disk's table; ``mbr.write_mbr`` and
``gpt.write_gpt`` produce the bytes of a new one. No FormatSpec is registered yet: volumes
are reached through a Disk, not probed as files of their own.
"""
