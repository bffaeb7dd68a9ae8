"""Tests of the .deb and .rpm that packaging/build.py makes."""
