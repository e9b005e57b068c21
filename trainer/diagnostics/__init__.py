"""Diagnostics of trained models that a researcher reads next to FID: where and how a student fails."""
