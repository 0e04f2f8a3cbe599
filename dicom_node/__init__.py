"""dicom-mc-node: the DICOM side of the node (SCP, spool, journal, assembler, pipeline, CLI)."""

__version__ = "0.1.0"
