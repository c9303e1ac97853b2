"""Write side: ``log()`` validates and snapshots values, the writer thread frames them into parts."""
