"""The gradexp server: ``pip install 'gradexp[server]'``, then ``gradexp server``."""

from .app import create_app

__all__ = ["create_app"]
