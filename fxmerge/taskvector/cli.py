"""``fxmerge merge-tv CONFIG.yaml OUT_DIR``: run a task-vector merge described by a YAML config.

Failures go through the root command's error handler (:mod:`fxmerge.cli`): one ``error:`` line, the JSON
document with ``--json``, exit status 2 for bad input (config, paths, missing or corrupt input files) and 1
when the merge itself fails.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings

import click
from tqdm.auto import tqdm

from fxmerge.taskvector.config import load_tv_config, merge_from_config

NAMES = {"out": "OUT_DIR", "overwrite=True": "--overwrite", "seed": "--seed"}


class _Bar:
    """tqdm progress bar on stderr, fed by the engine's (done, total) callback."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: tqdm | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit="step", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@click.command("merge-tv")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary line.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("--overwrite", is_flag=True,
              help="Replace OUT_DIR if it holds an earlier fxmerge output (never other files).")  # fmt: skip
@click.option("--seed", type=int, default=None, help="Override the config's seed for random masks.")
def merge_tv(config: str, out_dir: str, quiet: bool, as_json: bool, overwrite: bool, seed: int | None) -> None:
    """Merge fine-tunes of one base by task vectors (TA, TIES, DARE, DELLA, DPPA, ...).

    CONFIG is a mergekit-style YAML (merge_method, base_model, models, parameters, dtype,
    out_dtype); OUT_DIR receives an HF-style directory with sharded safetensors, the base's
    config and a manifest of the files. The output appears only if the whole merge succeeds;
    OUT_DIR must not be, contain or lie inside an input (base, models, config).
    """
    from fxmerge.cli import command_output

    out = command_output(quiet, as_json)
    bar = _Bar("merge-tv") if not (out.quiet or out.as_json) else None
    try:
        with out.working(NAMES), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cfg = load_tv_config(config)
            if seed is not None:
                cfg.seed = seed
            _, report = merge_from_config(cfg, out_dir, progress=bar or False, overwrite=overwrite)
    finally:
        if bar is not None:
            bar.close()
    if out.as_json:
        click.echo(json.dumps({"ok": True, **dataclasses.asdict(report)}, indent=2))
        return
    for w in caught:
        if not out.quiet:
            click.echo(f"warning: {w.message}", err=True)
    if not out.quiet:
        click.echo(
            f"merged {report.n_models} model(s) with {report.method}: {report.n_merged}/{report.n_tensors} tensors, "
            f"{report.n_params:,} parameters, {len(report.shards)} shard(s) -> {report.out_dir} in {report.seconds:.1f}s"
        )
