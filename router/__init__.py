"""dicom-router: a DICOM store-and-forward compression router."""

__version__ = "0.1.0"
