"""``download``, ``import-weights``, ``weights``, ``import-model``, ``models``: the weights and models
stuseg has, and getting more."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stuseg.cli.base import err, fail, out, user_errors
from stuseg.cli.options import CheckpointChoice, CheckpointOption
from stuseg.cli.render import progress_bar

__all__ = [
    "ManifestOption",
    "download_cmd",
    "import_model_cmd",
    "import_weights_cmd",
    "models_cmd",
    "weights_cmd",
]


ManifestOption = Annotated[
    Path | None,
    typer.Option("--manifest", metavar="FILE", help="Use another weights manifest (JSON) than the built-in."),
]


def _quiet_hub() -> None:
    """huggingface_hub logs retries as warnings; our own error line says what happened."""
    from huggingface_hub.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


@user_errors
def download_cmd(
    sizes: Annotated[
        list[str] | None,
        typer.Option(
            "--size", "-s", metavar="SIZE", help="small, base, large or huge (or S/B/L/H); repeatable."
        ),
    ] = None,
    all_sizes: Annotated[bool, typer.Option("--all", help="Every size in the manifest.")] = False,
    manifest: ManifestOption = None,
    force: Annotated[
        bool, typer.Option("--force", help="Download and convert again even if cached.")
    ] = False,
) -> None:
    """Download published weights from the Hugging Face hub, check size and sha256, convert them once."""
    from stuseg.weights import cache as weights
    from stuseg.weights.manifest import load_manifest

    if not sizes and not all_sizes:
        raise fail("choose what to download with --size SIZE (small, base, large, huge) or --all")
    _quiet_hub()
    chosen = list(load_manifest(manifest).entries) if all_sizes else sizes or []
    for size in chosen:
        with progress_bar() as report:
            result = weights.download_weights(size, manifest=manifest, force=force, progress=report)
        state = "downloaded, verified and converted" if result.fetched else "already in the cache"
        err.print(f"{result.size}: {state} (verified by {result.verified_by})", markup=False)
        typer.echo(str(result.path))


@user_errors
def import_weights_cmd(
    file: Annotated[
        Path,
        typer.Argument(
            help="A checkpoint from the authors' mirrors (e.g. base_ep4k.model) or a .safetensors."
        ),
    ],
    size: Annotated[
        str | None,
        typer.Option("--size", "-s", help="Expected size; inferred from the tensor shapes if omitted."),
    ] = None,
    manifest: ManifestOption = None,
) -> None:
    """Verify a checkpoint you got elsewhere (Google Drive, Baidu) and convert it into the cache."""
    from stuseg.weights import cache as weights

    with progress_bar() as report:
        result = weights.import_weights(file, size, manifest=manifest, progress=report)
    if result.note:
        err.print(f"note: {result.note}", markup=False)
    err.print(f"{result.size}: imported (verified by {result.verified_by})", markup=False)
    typer.echo(str(result.path))


@user_errors
def weights_cmd(
    manifest: ManifestOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show each model size: parameters, download size, whether verified weights are cached, and where."""
    from stuseg.weights import cache as weights

    rows = weights.weights_status(manifest)
    if as_json:
        import json

        typer.echo(
            json.dumps(
                [
                    {
                        "size": r.size,
                        "parameters": r.parameters,
                        "file": r.filename,
                        "file_bytes": r.file_bytes,
                        "approx_file_bytes": r.approx_file_bytes,
                        "pin": r.pin,
                        "present": r.present,
                        "verified_by": r.verified_by,
                        "damaged": r.damaged,
                        "path": str(r.path),
                    }
                    for r in rows
                ],
                indent=1,
            )
        )
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for title in ("size", "parameters", "download", "status", "path"):
        table.add_column(
            title,
            justify="right" if title in ("parameters", "download") else "left",
            overflow="fold" if title == "path" else "ellipsis",
        )
    for r in rows:
        download = f"{r.file_bytes / 1e6:,.0f} MB" if r.file_bytes else f"~{r.approx_file_bytes / 1e9:.2f} GB"
        if r.damaged:
            status = "damaged (see below)"
        else:
            status = f"cached, verified by {r.verified_by}" if r.present else "not downloaded"
        table.add_row(r.size, f"{r.parameters / 1e6:,.1f}M", download, status, str(r.path))
    out.print(table)
    for r in rows:
        if r.damaged:
            err.print(
                f"note: the cached weights for {r.size} are damaged ({r.damaged}); repair with "
                f"`stuseg download --size {r.size} --force` or import them again",
                markup=False,
            )


@user_errors
def import_model_cmd(
    folder: Annotated[
        Path, typer.Argument(help="An nnU-Net v1 or v2 model folder of an STU-Net (it holds fold_*).")
    ],
    name: Annotated[str, typer.Option("--name", help="The name to register it under.")],
    folds: Annotated[
        str | None, typer.Option("--folds", metavar="0,1", help="Folds to import. [default: every fold]")
    ] = None,
    checkpoint: CheckpointOption = CheckpointChoice.FINAL,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a model of the same name.")] = False,
) -> None:
    """Check a fine-tuned STU-Net's folder and register it: plan, labels and verified weights per fold."""
    from stuseg.weights import modelstore

    chosen = [f for f in folds.split(",") if f.strip()] if folds is not None else None
    model = modelstore.import_model(
        folder, name, folds=chosen, checkpoint=checkpoint.value, overwrite=overwrite
    )
    err.print(
        f"{name}: imported STU-Net {model.size} ({model.framework}, {len(model.labels)} labels, "
        f"fold{'s' if len(model.folds) > 1 else ''} {', '.join(f.name for f in model.folds)})",
        markup=False,
    )
    typer.echo(str(model.source))


@user_errors
def models_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List the fine-tuned models registered with import-model."""
    from stuseg.weights import modelstore

    rows = modelstore.registered_models()
    if as_json:
        import dataclasses
        import json

        typer.echo(json.dumps([dataclasses.asdict(r) for r in rows], indent=1, default=str))
        return
    if not rows:
        err.print("no models registered; register one with `stuseg import-model DIR --name NAME`")
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for title in ("name", "framework", "size", "classes", "channels", "folds", "source sha256"):
        table.add_column(title, justify="right" if title == "classes" else "left")
    for r in rows:
        if r.problem:
            table.add_row(r.name, "damaged (see below)", "", "", "", "", "")
            continue
        shas = ", ".join(s[:12] for s in r.source_sha256)
        table.add_row(
            r.name, r.framework, r.size, str(r.classes), ", ".join(r.channels), ", ".join(r.folds), shas
        )
    out.print(table)
    for r in rows:
        if r.problem:
            err.print(f"note: {r.name}: {r.problem}", markup=False)
