"""Export DICOM: a folder (optionally with a DICOMDIR) or a zip as a target,
and the ``export-dicom`` command. Written against ``dicomvault.engine`` only."""
