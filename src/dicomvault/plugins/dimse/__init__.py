"""Sending to a DICOM server (C-STORE): the ``cstore`` command and the
``dicom://`` target. A small synchronous DICOM upper-layer client of our own
(association, P-DATA, C-STORE), so files go out byte for byte, streamed."""
