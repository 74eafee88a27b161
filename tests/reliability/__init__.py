"""Reliability tests of issue 13 (a package: its module names repeat those of tests/)."""
