"""``transferkit-init DIR``: a starter config folder for your own project.

Writes a data config and an experiment that use the shipped groups, and a README with the
command that runs them. Your folder is added to Hydra's search path with ``--config-dir``
(or ``hydra.searchpath=[file://DIR]``), so its groups merge with the shipped ones:

    transferkit-init my_configs --data-root /path/to/images
    transferkit-finetune --config-dir my_configs experiment=my_data
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from transferkit.errors import ConfigError
from transferkit.io import atomic_write_bytes

DATA = """\
# Your images: {root}/<class>/*.jpg, or {root}/train|val|test/<class>/*.jpg.
# Extends the shipped data/image_folder config; any of its keys can be set here.
defaults:
  - image_folder
  - _self_

root: {root_yaml}
image_size: 224        # input resolution (pixels)
batch_size: 32         # per device
val_fraction: 0.1      # used when there is no val/ folder
test_fraction: 0.1     # used when there is no test/ folder
"""

EXPERIMENT = """\
# @package _global_
# transferkit-finetune --config-dir {folder} experiment={name}
# Any key of the shipped configs can be set here; the run's config is saved in its
# .hydra/config.yaml.
defaults:
  - override /data: {name}
  - override /finetune: auto      # how much to fine-tune, chosen from the data set's size
  - override /augment: none       # light | strong | ...: random augmentation (no caching)

seed: 42
trainer:
  max_epochs: null                # null: the fine-tuning plan's budget
"""

README = """\
# transferkit configs

`data/{name}.yaml` points at your images; `experiment/{name}.yaml` picks the data and the
settings. Run it with:

    transferkit-finetune --config-dir {folder} experiment={name}

Override anything on the command line, e.g. `trainer.max_epochs=5 optimizer.lr=3e-4`.
`transferkit-finetune --config-dir {folder} --help` lists the groups, yours included.
"""


def init(folder: str | Path, name: str = "my_data", data_root: str | None = None) -> list[Path]:
    """Write the starter configs into ``folder``; return the files written.

    Raises:
        ConfigError: ``name`` is not a plain config name, or a file already exists (nothing
            is overwritten, and nothing is written then).
    """
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]*", name):
        raise ConfigError(f"--name {name!r}: use letters, digits, _ and - (a config name).")
    folder = Path(folder).expanduser()
    root = data_root or "/path/to/your/images"
    files = {
        folder / "data" / f"{name}.yaml": DATA.format(root=root, root_yaml=json.dumps(root)),
        folder / "experiment" / f"{name}.yaml": EXPERIMENT.format(folder=folder, name=name),
        folder / "README.md": README.format(folder=folder, name=name),
    }
    existing = [str(p) for p in files if p.exists()]
    if existing:
        raise ConfigError(
            f"transferkit-init never overwrites files, and {existing} exist. Pick another "
            "folder or --name, or move them away."
        )
    for path, text in files.items():
        atomic_write_bytes(path, text.encode())
    return list(files)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="transferkit-init", description="Write a starter config folder for transferkit."
    )
    parser.add_argument("folder", help="the folder to create (or an existing one)")
    parser.add_argument("--name", default="my_data", help="name of the data and experiment")
    parser.add_argument("--data-root", help="your images: DIR/<class>/*.jpg")
    args = parser.parse_args(argv)
    from transferkit.cli import run_cli

    written = run_cli(lambda: init(args.folder, args.name, args.data_root))
    for path in written:
        print(f"wrote {path}")
    print(f"run: transferkit-finetune --config-dir {args.folder} experiment={args.name}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
