"""Example training scripts; `train.py` is the demo's (shipped as `florql.examples`)."""
