"""The Gradient Explorer: the web pages and their data endpoints, for ``gradexp server`` and
``gradexp ui`` alike. It reads runs through a :class:`~gradexp.explorer.catalog.Catalog`
that the host application hands it (run folders, or the server's database and store)."""
