"""`evomerge check RECIPE|CONFIG`: a pre-flight check of a merge recipe or a search's pool,
from headers and configs only, before anything is merged (evomerge/merging/preflight.py)."""

import sys
from pathlib import Path

import click


@click.command("check")
@click.argument("path", metavar="RECIPE|CONFIG", type=click.Path(path_type=Path))
def command(path: Path) -> None:
    """Check what merging RECIPE (or searching CONFIG's pool) would meet, reading headers and
    configs only: architectures and shapes, vocabularies and their alignment, tied embeddings,
    layer counts and their config keys, chat templates and stop tokens, adapters and their
    bases, dtypes. One line per finding; exit 2 if any finding blocks."""
    from evomerge.errors import UserError
    from evomerge.merging import preflight

    if not path.is_file():
        raise UserError(f"file {str(path)!r} does not exist")
    if preflight.is_search_config(path):
        from evomerge.search.config import load_run_config

        try:
            config = load_run_config(path)
        except UserError as exc:
            findings = [preflight.Finding("block", "config", str(exc))]
            pool = preflight.raw_pool(path)  # what can still be said about the models
            if pool is not None:
                findings += preflight.check_pool(*pool)
        else:
            tokenizer_keys = dict(config.pool.vocabulary())
            if config.pool.chat_template is not None:
                tokenizer_keys["chat_template"] = config.pool.chat_template
            findings = preflight.check_pool(
                config.pool.base, list(config.pool.models.values()), tokenizer_keys
            )
    else:
        findings = preflight.check_path(path)
    for finding in findings:
        click.echo(finding.line())
    blocked = preflight.blocked(findings)
    click.echo(
        f"{len(findings)} findings, "
        + ("blocked: this would be refused" if blocked else "nothing blocks")
    )
    if blocked:
        sys.exit(2)
