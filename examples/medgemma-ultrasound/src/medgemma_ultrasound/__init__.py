"""medgemma-ultrasound: an example medgemma-data plugin for ultrasound cine loops."""

__version__ = "0.1.0"
