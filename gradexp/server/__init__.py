"""The gradexp server: ``pip install -e '.[server]'`` in a clone, then ``gradexp server``."""

from gradexp.server.app import create_app

__all__ = ["create_app"]
