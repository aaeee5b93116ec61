"""`dowser probe` and `dowser mask`."""

import click

from . import user_errors


def _split(value):
    return tuple(x.strip() for x in value.split(",") if x.strip()) if value else ()


@click.command()
@click.argument("model")
@click.option("--revision", help="Branch, tag or commit of a Hub repo.")
@click.option("--out", type=click.Path(dir_okay=False), help="Output sidecar [default: NAME.dowser.safetensors].")
@click.option("--update-ratio", type=float, default=0.1, show_default=True, help="Trainable fraction of each matrix.")
@click.option("--layers", help="Decoder layers to score: all, last:N, A-B or a comma list [default: all].")
@click.option("--include", default="", help="Also score: lm_head, projector, vision, router (comma-separated).")
@click.option("--probes", type=int, default=64, show_default=True, help="Number of probe sequences.")
@click.option("--probe-len", type=int, default=64, show_default=True, help="Tokens per probe sequence.")
@click.option("--batch-size", type=int, default=4, show_default=True,
              help="Probe sequences per batch: one update of the statistics.")
@click.option("--draws", type=int, default=8, show_default=True, help="Rademacher draws per batch (M).")
@click.option("--images/--no-images", default=False, show_default=True, help="Add Gaussian-noise image probes.")
@click.option("--estimator", type=click.Choice(["reference", "hutchinson"]), default="reference", show_default=True,
              help="Sensitivity estimator: mean |gradient| as the released scripts, or the paper's root mean square.")
@click.option("--method", type=click.Choice(["dowser", "magnitude", "wanda", "random"]), default="dowser",
              show_default=True, help="Score: Dowser, or a baseline (|W|, Wanda's |W| x input norm, random).")
@click.option("--probe-file", type=click.Path(dir_okay=False), help="Token ids to use (JSONL lists or safetensors).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
              show_default=True, help="Compute dtype (auto: bfloat16 on a GPU, float32 where it lacks bfloat16 and on a CPU).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the probe prefixes, the sampling, the Rademacher draws and the noise images.")
@click.option("--save-stats/--no-save-stats", default=True, show_default=True,
              help="Keep score statistics so masks can be re-cut at any ratio.")
@click.option("--resident", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Keep the decoder layers in memory between uses (auto: on the GPU or in RAM if they fit in "
                   "the memory free now; never: re-read them on every pass).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Where the temporary layer cache of a Hub "
              "checkpoint goes [default: the working directory]; it is removed at the end.")
@click.option("--activation-budget", help="Memory for stored layer inputs per pass, e.g. 2GB "
              "[default: 1/4 of free RAM]; past it, batches go in several passes and spill to disk.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its OUT.resume state.")
@click.option("--allow-pickle", is_flag=True, help="Load *.bin pickles (weights_only=True).")
@click.option("--download", is_flag=True, help="Download whole Hub shards to the HF cache instead of ranged reads.")
@click.option("--card", is_flag=True, help="Also write a Hub model card (README.md) beside the sidecar, so that "
              "uploading the folder gives a usable Hub page.")
@click.option("--card-repo", help="The Hub repo the folder will be uploaded to, used in the card's commands "
              "[default: ORG/NAME].")
@click.option("--force", is_flag=True, help="Overwrite an existing output (and README.md with --card).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@user_errors
def probe(model, revision, out, include, activation_budget, resume, allow_pickle, download, card, card_repo, force,
          quiet, **options):
    """Stream MODEL (folder or Hub id) block by block and write its mask sidecar."""
    from ..probe.run import ProbeSettings, parse_size, probe as run_probe
    from ..sidecar.file import default_sidecar_name

    budget = parse_size(activation_budget) if activation_budget else None
    settings = ProbeSettings(include=_split(include), activation_budget=budget, **options)
    if card_repo and not card:
        from ..errors import DowserError

        raise DowserError("--card-repo names the repo in the model card: pass --card too")
    if card:  # refused before any work when README.md exists
        from ..interop.card import card_destination

        card_destination(out or default_sidecar_name(model), force)
    summary = run_probe(model, out, revision=revision, settings=settings, force=force, resume=resume,
                        allow_pickle=allow_pickle, download=download, progress=not quiet)
    if summary["rank"] != 0:
        return
    click.echo(summary_line(summary))
    if summary["unscored"]:
        click.echo(unscored_line(summary["unscored"]))
    if card:
        from ..interop.card import write_model_card

        click.echo(f"wrote {write_model_card(summary['path'], repo_id=card_repo, force=force)}")


def summary_line(summary: dict) -> str:
    """The probe's one-line report: what was written, where the time went, how often the weights were read."""
    t = summary["timings"]
    times = [f"{label} {t[key]:.1f}s" for key, label in (("generate_s", "generation"), ("probe_s", "statistics"))
             if key in t]
    passes = summary["weight_passes"]
    if summary["tier"] in ("gpu", "ram"):
        reads = f"weights read once, kept in {'GPU memory' if summary['tier'] == 'gpu' else 'RAM'}"
    else:
        reads = f"{passes:g} passes over the weights: they fit in no memory tier"
    notes = [f"{summary['passes']} pass{'es' if summary['passes'] != 1 else ''}"
             + (", activations spilled to disk" if summary["spilled"] else ""),
             f"computed in {summary['dtype']} on {summary['device']}"]
    return (f"wrote {summary['path']}: {summary['tensors']} tensors, {summary['weights']:,} weights, "
            f"{summary['protected_fraction']:.4f} protected, in {summary['seconds']:.1f}s "
            f"({', '.join(times + [reads] + notes)})")


def unscored_line(unscored: dict) -> str:
    """One line: how many candidate tensors the probe left unscored, and why, grouped by reason."""
    import re

    reasons: dict[str, int] = {}
    for why in unscored.values():
        short = re.sub(r"\b\d+\b", "N", why.split(":")[0].split(" (")[0])  # "expert 3 of ..." -> "expert N of ..."
        reasons[short] = reasons.get(short, 0) + 1
    parts = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items(), key=lambda x: -x[1]))
    return f"not scored: {len(unscored)} tensor{'s' if len(unscored) != 1 else ''} ({parts}); dowser inspect lists each"


@click.command()
@click.argument("sidecar")
@click.option("--revision", help="Branch, tag or commit of a Hub sidecar (REPO_ID or REPO_ID/FILE).")
@click.option("--update-ratio", type=float, required=True, help="New trainable fraction of each matrix.")
@click.option("--base", help="Base model (folder or Hub id) [default: the one the sidecar records].")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Output sidecar.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@user_errors
def mask(sidecar, revision, update_ratio, base, out, force):
    """Re-cut a sidecar's masks (a file, or a Hub REPO_ID or REPO_ID/FILE) at another update ratio from its
    saved statistics or scores (no probing)."""
    from ..sidecar.file import recut_sidecar

    path = recut_sidecar(sidecar, update_ratio, out, base=base, force=force, revision=revision)
    click.echo(f"wrote {path} at update ratio {update_ratio}")
