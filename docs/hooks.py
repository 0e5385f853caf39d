"""MkDocs hooks: the pages that must not drift from the code are generated when the site is built.

- `<!-- config-reference -->` becomes the configuration reference (gossiplab.config.config_reference).
- Before the build, short real runs of each study's preset write the figures the pages show into
  docs/generated/ (not committed): the default, the single global merge, DIMAT, L2C and MAZEL.
  With GOSSIPLAB_DOCS_RUNS set to a folder of finished run directories named like FIGURES' keys,
  their plots are taken instead (the tests hand over the runs of the pages' own walk-through).
- Comparisons (COMPARISONS) run a few short variants and draw them in one figure: the real-networks
  page's synchronous and asynchronous SGD on uneven devices against the simulated clock, and DSGD
  and CHOCO-SGD against the bytes sent.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

# MkDocs prints its own loggers' records ("INFO    -  ..."), so a build's log says which run it is training
log = logging.getLogger("mkdocs.hooks.gossiplab")

FIGURES = {  # folder -> (preset, overrides, plots the pages show); short runs: the site builds in the tests
    "default": ("default", ["train.steps=200", "eval.every=25"],
                ["accuracy", "consensus", "accuracy_matrix", "topology", "mixing"]),
    "single-merge": ("final-merge-only", ["train.steps=200", "eval.every=25"], ["accuracy", "accuracy_matrix"]),
    "dimat": ("dimat", ["train.steps=300", "eval.every=25", "gossip.start_after=100", "gossip.every=50"],
              ["accuracy", "accuracy_matrix"]),
    "l2c": ("l2c", ["train.steps=300", "eval.every=50", "gossip.every=50", "l2c.prune_round=3"],
            ["accuracy", "learned_weights"]),
    "mazel": ("mazel-8site", ["train.steps=100", "eval.every=25", "gossip.every=25", "data.train_per_source=400",
                              "data.test_per_source=150"], ["accuracy", "accuracy_matrix"]),
}  # fmt: skip
DEVICES = ["network.compute_time=0.05", "network.compute_spread=0.5", "network.latency=0.05",
           "network.bandwidth=12.5e6", "gossip.topology=ring", "gossip.every=1", "train.momentum=0"]  # fmt: skip
COMPARISONS = {  # folder -> figure, x, variants (label -> preset, overrides)
    "networks": ("compare_time", "simulated_time_s", {  # 400 D-PSGD rounds and the ticks of the same time
        "D-PSGD": ("default", [*DEVICES, "train.steps=400", "eval.every=40"]),
        "AD-PSGD": ("default", [*DEVICES, "gossip.algorithm=ad-psgd", "train.steps=740", "eval.every=74"]),
    }),
    "compression": ("compare_bytes", "bytes_sent", {
        "DSGD": ("default", ["train.steps=400", "eval.every=40"]),
        "CHOCO top-10%": ("default", ["gossip.algorithm=choco-sgd", "train.steps=400", "eval.every=40"]),
    }),
}  # fmt: skip


def on_pre_build(config) -> None:
    import gossiplab
    from gossiplab.compare import AXES, plot_curves

    generated = Path(config["docs_dir"]) / "generated"
    given = Path(os.environ["GOSSIPLAB_DOCS_RUNS"]) if os.environ.get("GOSSIPLAB_DOCS_RUNS") else None
    for folder, (preset, overrides, plots) in FIGURES.items():
        target = generated / folder
        target.mkdir(parents=True, exist_ok=True)
        if given is not None and all((given / folder / f"{plot}.png").is_file() for plot in plots):
            source = given / folder
        elif all((target / f"{plot}.png").is_file() for plot in plots):
            continue
        else:
            source = Path(tempfile.mkdtemp()) / "run"
            log.info("Training the figures' run '%s' (preset %s, %s), cached in %s", folder, preset,
                     " ".join(overrides), target)  # fmt: skip
            gossiplab.run(preset, overrides, run_dir=source)
        for plot in plots:
            shutil.copyfile(source / f"{plot}.png", target / f"{plot}.png")
    for folder, (figure, x, variants) in COMPARISONS.items():
        target = generated / folder / f"{figure}.png"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            runs = Path(tempfile.mkdtemp())
            log.info("Training the comparison '%s' (%s), cached in %s", folder, ", ".join(variants), target)
            groups = {label: [gossiplab.run(preset, overrides, run_dir=runs / label).final]
                      for label, (preset, overrides) in variants.items()}  # fmt: skip
            plot_curves(f"merged and local models against {AXES[x]}", groups, target, x=x)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- config-reference -->" in markdown:
        from gossiplab.config import config_reference

        header = "| key | default | meaning and allowed values |\n|---|---|---|\n"
        markdown = markdown.replace("<!-- config-reference -->", header + "\n".join(config_reference()))
    return markdown
