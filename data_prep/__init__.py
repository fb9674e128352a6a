"""Offline data step: image folders -> audited, patient-level, reproducible TFRecord splits."""
