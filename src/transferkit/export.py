"""``transferkit-export`` / ``make export ckpt=PATH format=onnx|torchscript``.

Exports the checkpoint's model (input: a normalised ``(N, 3, H, W)`` batch; output: logits),
then runs the exported file on a sample batch of another size than the one traced and
compares it with the checkpoint's outputs: the command prints the maximum absolute
difference and the tolerance, and fails when the difference exceeds it. The class names and
the preprocessing travel inside the file (TorchScript extra file / ONNX metadata
``transferkit``), so the exported model is as self-contained as the checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from transferkit.checkpoint_io import load_classifier
from transferkit.cli import CONFIG_DIR, run_cli
from transferkit.errors import ConfigError, MissingPackageError
from transferkit.evaluate import require
from transferkit.trust import TargetPolicy

log = logging.getLogger("transferkit")
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


class ExportMismatchError(RuntimeError):
    """The exported model's outputs differ from the checkpoint's by more than the tolerance."""


def _sample(batch: int, size: int, seed: int) -> torch.Tensor:
    """Normalised-image-like inputs (zero mean, unit variance), reproducible."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def export_torchscript(model: Any, example: torch.Tensor, path: Path, meta: str) -> None:
    """Trace with Lightning's ``to_torchscript`` and save with a ``transferkit.json`` entry."""
    with warnings.catch_warnings():  # torch.jit's deprecation notice, once per traced call
        warnings.simplefilter("ignore", FutureWarning)
        script = model.to_torchscript(method="trace", example_inputs=example)
    torch.jit.save(script, str(path), _extra_files={"transferkit.json": meta})


def export_onnx(model: Any, example: torch.Tensor, path: Path, meta: str) -> None:
    """Lightning's ``to_onnx`` (dynamic batch), then the ``transferkit`` metadata entry."""
    import onnx

    model.to_onnx(
        str(path),
        example,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        external_data=False,
    )
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "transferkit", meta
    onnx.save(proto, str(path))


def run_exported(path: Path, fmt: str, x: torch.Tensor) -> np.ndarray:
    """The exported file's outputs on ``x``, run by its own runtime."""
    if fmt == "torchscript":
        with torch.no_grad():
            return torch.jit.load(str(path), map_location="cpu")(x).numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export ``cfg.ckpt`` as ``cfg.format``, check it, return path and difference."""
    require(cfg, "ckpt")
    fmt = str(cfg.format)
    if fmt not in SUFFIX:
        raise ConfigError(f"format={fmt!r}; choose one of {sorted(SUFFIX)}.")
    if fmt == "onnx":
        missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
        if missing:
            raise MissingPackageError(
                f"format=onnx needs {', '.join(missing)}: pip install 'transferkit[export]' "
                f"(or pip install {' '.join(missing)}), or use format=torchscript."
            )
    model = load_classifier(cfg.ckpt, policy=TargetPolicy.from_config(cfg))
    size = int(model.preprocessing["image_size"])
    meta = json.dumps(
        {
            "class_names": model.hparams["class_names"],
            "preprocessing": model.preprocessing,
            "backbone": model.hparams["backbone"],
            "checkpoint": str(cfg.ckpt),
            # multi-label: the outputs are per-class logits, positive at sigmoid >= threshold
            "task": "multilabel" if model.multilabel else "multiclass",
            "thresholds": torch.as_tensor(model.thresholds).tolist() if model.multilabel else None,
        }
    )
    out = (
        Path(cfg.output)
        if cfg.get("output")
        else Path(cfg.paths.output_dir) / f"model{SUFFIX[fmt]}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=SUFFIX[fmt])
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        (export_torchscript if fmt == "torchscript" else export_onnx)(
            model, _sample(2, size, cfg.seed), tmp, meta
        )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)

    check = _sample(int(cfg.check_batch), size, cfg.seed + 1)  # another batch size than traced
    with torch.no_grad():
        expected = model(check).numpy()
    got = run_exported(out, fmt, check)
    diff = float(np.abs(got - expected).max())
    ok = diff <= float(cfg.tolerance)
    print(f"exported {fmt} model to {out}")
    print(
        f"checked on {check.shape[0]} sample input(s) of {tuple(check.shape[1:])}: max abs logit "
        f"difference {diff:.3g} vs the checkpoint (tolerance {float(cfg.tolerance):g}): "
        + ("OK" if ok else "FAILED")
    )
    if not ok:
        raise ExportMismatchError(
            f"exported {fmt} outputs differ by {diff:.3g} > tolerance {cfg.tolerance}"
        )
    return {"path": out, "max_abs_diff": diff, "tolerance": float(cfg.tolerance)}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        run_cli(lambda: export(cfg))
    except ExportMismatchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
