"""Read side: one :class:`RunReader` protocol, implemented over local run folders and a server."""
