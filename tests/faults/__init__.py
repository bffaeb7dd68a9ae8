"""Fault-injection suite: kill -9, damaged objects, full disks, racing writers, S3 faults and signals (README.md)."""
