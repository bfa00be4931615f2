"""Applications built on the lightcrl library: the trainer, evaluation orchestration and its task table,
the experiment grid, quickstart, search, reports, plots and the command line.

Data flows one way: library (encoders -> store -> features -> model/losses) -> these applications. Nothing
in the library imports this package (``tests/test_layout.py`` walks the imports to keep it so).
"""
