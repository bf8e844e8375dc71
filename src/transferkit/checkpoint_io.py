"""Checkpoints: written atomically, loaded for inference without data or network, resumed exactly.

- :class:`AtomicCheckpointIO` (trainer ``plugins``): a crash mid-write never leaves a
  half-written ``best.ckpt``; the previous one stays intact.
- :func:`load_classifier`: an :class:`ImageClassifier` from a checkpoint alone (weights are
  random-initialised, then overwritten, so no hub and no weights package is touched).
- :class:`RNGState` (added by the model's ``configure_callbacks``): the random generators'
  state travels in the checkpoint, so a resumed run shuffles, augments and drops out exactly
  as the uninterrupted run would have.
- :func:`check_classes`: a checkpoint trained on other classes than the data is a clear error.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from transferkit.errors import CheckpointError, CheckpointNotFoundError
from transferkit.io import atomic_open
from transferkit.trust import TargetPolicy, check_targets

if TYPE_CHECKING:
    from transferkit.models.classifier import ImageClassifier

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file in the checkpoint's folder, fsync, ``os.replace``.

    Lightning's own writer goes through fsspec without fsync; a crash or a full disk can then
    leave a truncated ``best.ckpt``. Here the old file is replaced only by a complete one.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options.")
        with atomic_open(path) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Always ``weights_only=True``: Lightning 2.6 resumes with ``weights_only=False``,
        which unpickles (and so runs) whatever a ``.ckpt`` file holds."""
        where = {} if map_location is None else {"map_location": map_location}
        return super().load_checkpoint(path, weights_only=True, **where)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, read with ``weights_only=True`` (no code runs on load).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable transferkit checkpoint.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"checkpoint {str(path)!r} does not exist. Pass the path of a .ckpt file, "
            "e.g. outputs/<date>/<time>/checkpoints/best.ckpt."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} ({type(e).__name__}: {str(e)[:200]}). "
            "Is it a complete .ckpt file written by transferkit?"
        ) from e
    if (
        not isinstance(ckpt, dict)
        or not isinstance(ckpt.get("hyper_parameters"), dict)
        or not isinstance(ckpt.get("state_dict"), dict)
    ):
        raise CheckpointError(
            f"{str(path)!r} is not a transferkit checkpoint (no hyper_parameters/state_dict). "
            "Pass a .ckpt file from a transferkit run (checkpoints/best.ckpt or last.ckpt)."
        )
    _check_hparam_types(ckpt["hyper_parameters"], path)
    return ckpt


_NUMBER = (int, float)
#: The hyper-parameters of a transferkit checkpoint (what the model is built from) and their
#: types. ``weights`` and ``pretrained`` are not among them: loading never downloads or reads
#: other files, the checkpoint's state dict replaces the initial weights; ``compile`` is
#: ignored when loading for inference.
HPARAM_TYPES: dict[str, tuple[type, ...]] = {
    "backbone": (str,), "num_classes": (int,), "head": (dict, type(None)),
    "drop_rate": _NUMBER, "drop_path_rate": (*_NUMBER, type(None)),
    "class_names": (list, type(None)), "image_size": (int,), "crop_pct": _NUMBER,
    "label_smoothing": _NUMBER, "l1": _NUMBER, "l1_scope": (str,),
    "decay_norm_and_bias": (bool,), "backbone_norm": (str,), "mixup": (dict, type(None)),
    "channels_last": (bool,), "compile": (bool, str), "compile_backend": (str,),
    "task": (str,), "multilabel_loss": (str,),
}  # fmt: skip


def _check_hparam_types(hparams: dict[str, Any], path: Path) -> None:
    """A file with the right keys but values of other types (a hostile or damaged file)
    fails here with one line, not deep inside timm or torch."""
    wrong = [
        f"{key}={value!r}"
        for key, value in hparams.items()
        if key in HPARAM_TYPES
        and (not isinstance(value, HPARAM_TYPES[key])
             or (isinstance(value, bool) and bool not in HPARAM_TYPES[key]))
    ]  # fmt: skip
    names = hparams.get("class_names")
    if isinstance(names, list) and not all(isinstance(n, str) for n in names):
        wrong.append(f"class_names={names!r}")
    for key in ("backbone", "num_classes"):
        if key not in hparams:
            wrong.append(f"{key} missing")
    if wrong:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has hyper-parameters of the wrong type: "
            f"{', '.join(wrong)}. It was not written by transferkit, or it is damaged."
        )


def load_classifier(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    policy: TargetPolicy | None = None,
) -> ImageClassifier:
    """An :class:`ImageClassifier` in eval mode from a checkpoint alone.

    The file is read once, with ``weights_only=True``. The head and any other Hydra node in
    its hyper-parameters are instantiated only if ``policy`` allows their ``_target_``
    (transferkit's own classes by default). The backbone is created with random weights,
    then the checkpoint's state dict replaces them: no hub, no weights package. Class names
    and preprocessing come from the checkpoint.

    Raises:
        CheckpointNotFoundError: no such file.
        CheckpointError: not a transferkit checkpoint, or keys it may not set.
        UntrustedCheckpointError: it names code the policy does not allow.
    """
    from transferkit.models.classifier import ImageClassifier

    ckpt = read_checkpoint(path)
    hparams = dict(ckpt["hyper_parameters"])
    check_targets(_instantiated(hparams), policy or TargetPolicy(), f"checkpoint {str(path)!r}")
    unknown = sorted(set(hparams) - set(HPARAM_TYPES))
    if unknown:
        raise CheckpointError(
            f"checkpoint {str(path)!r} sets {unknown}, which a transferkit checkpoint does not "
            f"hold (it may set {sorted(HPARAM_TYPES)}). Was it written by transferkit?"
        )
    model = ImageClassifier(**{**hparams, "compile": False})
    model.on_load_checkpoint(ckpt)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(
            f"the weights in checkpoint {str(path)!r} do not fit the model its "
            f"hyper-parameters describe ({str(e).splitlines()[0][:200]}). It is damaged, "
            "or its hyper-parameters were edited."
        ) from e
    return model.to(map_location).eval()


def _instantiated(hparams: dict[str, Any]) -> dict[str, Any]:
    """What of the hyper-parameters reaches Hydra's ``instantiate`` or could one day (all of
    it, but the class names: folder names may hold ``${`` and are never resolved)."""
    return {k: v for k, v in hparams.items() if k != "class_names"}


def store_thresholds(paths: Sequence[str | Path], thresholds: torch.Tensor) -> None:
    """Write tuned multi-label thresholds into checkpoints (atomically; the raw weights of
    an EMA run too), so that evaluate, predict and a resumed run use them."""
    for path in dict.fromkeys(str(p) for p in paths):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "current_model_state"):
            if key in ckpt:
                ckpt[key]["thresholds"] = thresholds.detach().cpu().clone()
        with atomic_open(path) as f:
            torch.save(ckpt, f)


def check_classes(
    ckpt_classes: Sequence[str] | None, data_classes: Sequence[str], what: str
) -> None:
    """Raise when the data has classes the checkpoint was not trained on.

    Raises:
        ValueError: names the classes only one side has, and the fix.
    """
    if ckpt_classes is None or list(ckpt_classes) == list(data_classes):
        return
    unknown = [c for c in data_classes if c not in ckpt_classes]
    missing = [c for c in ckpt_classes if c not in data_classes]
    detail = []
    if unknown:
        detail.append(f"the data has {unknown} which the checkpoint does not know")
    if missing:
        detail.append(f"the checkpoint has {missing} which the data lacks")
    if not detail:
        detail.append("the same names in another order")
    raise CheckpointError(
        f"the checkpoint's classes {list(ckpt_classes)} do not match the data's "
        f"{list(data_classes)}: {'; '.join(detail)}. {what}"
    )


def check_resume(
    path: str | Path,
    backbone: str,
    data_classes: Sequence[str],
    policy: TargetPolicy | None = None,
    data_order: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Fail before training when ``ckpt_path`` cannot continue this run; else return the
    checkpoint (read with ``weights_only=True``).

    The run's own config builds the model; the checkpoint only gives it state. A
    checkpoint that names code the run's config does not (``policy``) is still refused:
    it was not written by this configuration.

    Raises:
        CheckpointNotFoundError: no such checkpoint.
        CheckpointError: another backbone, other classes, or not a training checkpoint.
        UntrustedCheckpointError: it names code the policy does not allow.
        CheckpointError: saved in the middle of an epoch with another ``data_order``
            (``batch_per_device``, ``devices``, ``seed``): the resumed epoch would skip
            other images than those it trained on.
    """
    ckpt = read_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    check_targets(_instantiated(hp), policy or TargetPolicy(), f"ckpt_path={str(path)!r}")
    fix = "Resume with a checkpoint of this run's configuration, or set ckpt_path=null."
    if hp.get("backbone") != backbone:
        raise CheckpointError(
            f"ckpt_path={str(path)!r} holds a {hp.get('backbone')!r} model but "
            f"model.backbone={backbone!r}. {fix}"
        )
    check_classes(hp.get("class_names"), data_classes, fix)
    if "optimizer_states" not in ckpt or "loops" not in ckpt:
        raise CheckpointError(
            f"ckpt_path={str(path)!r} has no optimizer/loop state (saved with weights only), "
            "so training cannot resume from it; start a new run (ckpt_path=null)."
        )
    stopped = next(
        (v["mid_epoch"] for v in (ckpt.get("callbacks") or {}).values()
         if isinstance(v, dict) and isinstance(v.get("mid_epoch"), dict)),
        None,
    )  # fmt: skip
    if stopped and data_order:
        saved = {k: stopped.get(k) for k in data_order}
        if saved != data_order:
            raise CheckpointError(
                f"ckpt_path={str(path)!r} was saved in the middle of an epoch "
                f"({stopped.get('batches_done')} batches done) with {saved}; this run has "
                f"{data_order}, so it would continue on other images. Resume with "
                "data.batch_size, the devices and seed the run had, or from a checkpoint "
                "saved at the end of an epoch."
            )
    run_dir = Path(path).expanduser().resolve().parent.parent
    log.info("resuming from %s (epoch %s)", path, ckpt.get("epoch"))
    log.info(
        "the best checkpoint so far is tracked in %s; resume there with hydra.run.dir", run_dir
    )
    return ckpt


def early_stopped_epochs(
    ckpt: dict[str, Any], state_keys: Collection[str] | None = None
) -> tuple[int, str] | None:
    """``(epochs, why)`` when early stopping had ended the checkpoint's run after ``epochs``
    epochs, else None. ``state_keys``: look only at the states of these callbacks (those
    Lightning will restore into the resumed run's early stopping); None: at any.

    Lightning keeps the early-stopping callback's state (why it stopped, and at which epoch)
    in the checkpoint but not the stop itself: resumed, such a run trains on to its next
    check, and on from there if that one improves. The caller caps the epochs here.
    """
    keys = {"wait_count", "stopped_epoch", "patience"}  # an EarlyStopping's, of any class
    for key, state in (ckpt.get("callbacks") or {}).items():
        if state_keys is not None and key not in state_keys:
            continue
        if not (isinstance(state, dict) and keys <= set(state)):
            continue
        reason = state.get("stopping_reason")  # Lightning >= 2.6; before, patience only
        ended = bool(reason) if reason is not None else 0 < state["patience"] <= state["wait_count"]
        if ended:
            why = state.get("stopping_reason_message") or (
                f"no improvement in {state['wait_count']} checks"
            )
            why = why.replace("Signaling Trainer to stop.", "").strip().rstrip(".")
            return int(state["stopped_epoch"]) + 1, why
    return None


def class_index_map(ckpt_classes: Sequence[str], data_classes: Sequence[str]) -> np.ndarray:
    """Data label → checkpoint label, for evaluating on a folder with a subset of the classes.

    Raises:
        ValueError: a data class the checkpoint does not know.
    """
    unknown = [c for c in data_classes if c not in ckpt_classes]
    if unknown:
        raise CheckpointError(
            f"the data has classes {unknown} that the checkpoint was not trained on (it knows "
            f"{list(ckpt_classes)}). Evaluate on a folder whose sub-folders are among those "
            "names, or on the checkpoint that was trained on these classes."
        )
    return np.asarray([list(ckpt_classes).index(c) for c in data_classes], dtype=np.int64)


class RNGState(L.Callback):
    """Saves the torch (CPU and CUDA), numpy and Python generator states in checkpoints.

    Lightning restores the epoch, optimizer and scheduler but not the generators: a resumed
    run would reshuffle, re-augment and re-drop-out from the seed instead of continuing. With
    ``num_workers > 0`` the workers' own generators are re-seeded per epoch by PyTorch from
    the main process's generator, so this covers them too unless workers are persistent.
    """

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        version, internal, gauss_next = random.getstate()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(np.asarray(keys, np.int64)), pos, has_gauss, gauss],
            "python": [version, list(internal), gauss_next],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        kind, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = state_dict["python"]
        random.setstate((version, tuple(internal), gauss_next))
        if "cuda" in state_dict and torch.cuda.is_available():
            cuda = state_dict["cuda"]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
