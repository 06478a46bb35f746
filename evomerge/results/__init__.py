"""What a finished search gives its user: the report, export, and held-out scoring.

The top library layer: only `cli` and `bench` import it. Kept light (this file imports
nothing): reading a study for `report` or `export` loads no torch; only held-out scoring and
the export's merge do.
"""
