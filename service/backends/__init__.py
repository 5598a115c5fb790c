"""Inference backends behind one narrow protocol (see base.py)."""
