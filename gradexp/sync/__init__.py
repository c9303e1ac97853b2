"""Sender side: the detached process that uploads a run's parts, and ``gradexp sync``."""
