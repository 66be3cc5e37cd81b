"""Offline tools around the bundle: dataset preparation, the classical baseline, the benchmark, the bundle archive and
deployable exports. Run as ``python -m tools.<module>``; the bundle's configs never reference them, and the exported
archive does not ship them (it ships ``scripts/``, what the bundle runs)."""
