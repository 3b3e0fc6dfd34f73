"""Format implementations, one module (or package) per format; see ``imgbridge.registry``."""
