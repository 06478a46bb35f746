"""What a finished search gives its user: the report, export, and held-out scoring.

The top library layer: only `cli` and `bench` import it.
"""
