"""Shared test helpers: pytest plugins (fixtures), tiny models, the mergekit environment."""
