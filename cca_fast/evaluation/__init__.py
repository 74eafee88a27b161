"""Prompting, answer extraction, accuracy, statistics and the side-effect suites."""
