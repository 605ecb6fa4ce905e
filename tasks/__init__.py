"""Datasets as Tasks: conversations to train on and problems to evaluate, each scored by its own rule."""
