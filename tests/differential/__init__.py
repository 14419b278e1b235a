"""Differential testing of hindsight answers against stores that logged everything from the start."""
