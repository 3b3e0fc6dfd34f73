"""Conversions between the two worlds; ``planner`` picks the path for a pair of kinds."""
