"""Ray jobs, one readable module per job (installed as ``bluelm_v.jobs``).

Each module has ``run(ctx) -> dict`` (the summary), an optional ``validate(cfg, registry)``, and
a docstring whose first line is its purpose and which lists its exact commands.
"""
