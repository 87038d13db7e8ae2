"""Shared core of distillery's stages: the record schema and record-file I/O."""
