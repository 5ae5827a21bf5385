"""Backbones: plain nn.Modules with no meta-learning logic."""
