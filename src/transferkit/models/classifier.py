"""The LightningModule: a timm backbone, a replaceable head, a fine-tuning plan."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import hydra
import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf
from timm.data import resolve_data_config
from torch import nn
from torch.optim import Optimizer
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MultilabelAccuracy

from transferkit.callbacks.compile_watch import COMPILE_MODES, CompileWatch, graph_bound
from transferkit.data.transforms import BatchMixup
from transferkit.errors import ConfigError
from transferkit.models.backbone import create_backbone
from transferkit.models.finetuning import (
    backbone_blocks,
    batchnorm_param_names,
    frozen_stat_modules,
    param_groups,
    trainable_names,
)
from transferkit.models.metrics import eval_metrics
from transferkit.models.multilabel import check_loss, multilabel_loss
from transferkit.models.multilabel import eval_metrics as multilabel_metrics
from transferkit.models.norms import convert_backbone_norm
from transferkit.policy import Plan

log = logging.getLogger(__name__)

DEFAULT_HEAD = {"_target_": "transferkit.models.heads.LinearHead", "_partial_": True}


def compile_mode(setting: bool | str) -> str | None:
    """``model.compile`` as a ``torch.compile`` mode (``None``: its default).

    Raises:
        ConfigError: an unknown mode, with the known ones.
    """
    if setting is True or setting == "default":
        return None
    if setting not in COMPILE_MODES:
        raise ConfigError(
            f"model.compile={setting!r}; choose false, true or one of {', '.join(COMPILE_MODES)}."
        )
    return str(setting)


class ImageClassifier(L.LightningModule):
    """Fine-tune a timm backbone with a replaceable head.

    Args:
        backbone: timm model name.
        num_classes: number of classes.
        head: Hydra config of the head (``_target_`` with ``_partial_: true``; it is called
            with ``in_features, num_classes``). Stored as plain data in the checkpoint.
        weights: ``embedded``, ``hub``, ``none`` or a file path (see ``create_backbone``).
            Not stored: a checkpoint already holds the weights.
        pretrained: ``true`` means ``weights=hub`` (timm's ``pretrained=True``).
        drop_rate: timm's dropout before the classifier.
        drop_path_rate: timm's stochastic depth.
        class_names: names of the classes, in label order.
        image_size: input resolution.
        crop_pct: evaluation centre-crop fraction.
        label_smoothing: cross-entropy label smoothing.
        l1: weight λ of the L1 penalty λ·Σ|w|.
        l1_scope: which parameters the L1 penalty covers: ``head``, ``weights`` (trainable
            weights, no biases or norms) or ``all`` (every trainable parameter).
        decay_norm_and_bias: apply weight decay to norm weights and biases too.
        backbone_norm: ``keep`` the backbone's BatchNorm, or convert it to ``groupnorm``,
            ``instancenorm`` or ``syncbn`` (see ``convert_backbone_norm``).
        mixup: options of timm's ``Mixup`` (mixup / CutMix on training batches, soft
            targets smoothed by ``label_smoothing``); ``None``: off.
        channels_last: keep the backbone and its inputs in NHWC memory format; ``auto``
            starts without it and lets ``trainer.precision=auto`` decide
            (:meth:`set_channels_last`).
        compile: ``torch.compile`` the backbone (in place, so checkpoints are unchanged):
            ``true`` or a mode (``reduce-overhead``: CUDA graphs, for launch-bound small
            images; ``max-autotune-no-cudagraphs``, ...). Recompiles are counted and bounded
            (``transferkit.callbacks.compile_watch``).
        compile_backend: ``torch.compile`` backend (``inductor``; ``eager`` to debug).
        task: ``multiclass`` (one class per image, softmax) or ``multilabel`` (a set of
            classes per image, sigmoids: see ``transferkit.models.multilabel``).
        multilabel_loss: ``bce`` or ``asl`` (asymmetric loss), for ``multilabel``.
        optimizer: ``functools.partial`` of a torch optimizer (gets the parameter groups).
        scheduler: Hydra scheduler node ``{scheduler: partial, interval, monitor}``.
        plan: the fine-tuning plan (default: everything trains).
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        head: Mapping[str, Any] | None = None,
        weights: str | None = "none",
        pretrained: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        class_names: list[str] | None = None,
        image_size: int = 224,
        crop_pct: float = 1.0,
        label_smoothing: float = 0.0,
        l1: float = 0.0,
        l1_scope: str = "weights",
        decay_norm_and_bias: bool = False,
        backbone_norm: str = "keep",
        mixup: Mapping[str, Any] | None = None,
        channels_last: bool | str = False,
        compile: bool | str = False,
        compile_backend: str = "inductor",
        task: str = "multiclass",
        multilabel_loss: str = "bce",
        optimizer: Callable[..., Optimizer] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        plan: Plan | None = None,
    ) -> None:
        super().__init__()
        if isinstance(head, DictConfig):
            head = OmegaConf.to_container(head, resolve=True)  # type: ignore[assignment]
        head = dict(head or DEFAULT_HEAD)
        if isinstance(mixup, DictConfig):
            mixup = OmegaConf.to_container(mixup, resolve=True)  # type: ignore[assignment]
        if class_names is not None:
            class_names = list(class_names)
            if len(class_names) != num_classes:
                raise ConfigError(
                    f"{len(class_names)} class names given for num_classes={num_classes}."
                )
        if task not in ("multiclass", "multilabel"):
            raise ConfigError(f"task={task!r}; choose multiclass or multilabel.")
        if task == "multilabel":
            check_loss(multilabel_loss)
            if mixup is not None or label_smoothing:
                raise ConfigError(
                    "task=multilabel takes neither mixup nor label smoothing (they mix or "
                    "smooth one class per image): use augment=none|light|strong|cutout and "
                    "regularization.label_smoothing=0."
                )
        if l1_scope not in ("head", "weights", "all"):
            raise ConfigError(f"l1_scope={l1_scope!r}; choose 'head', 'weights' or 'all'.")
        if channels_last not in (True, False, "auto"):
            raise ConfigError(f"model.channels_last={channels_last!r}; choose true, false or auto.")
        channels_last = channels_last is True  # saved as a bool ("auto" is decided later)
        self.save_hyperparameters(
            ignore=["weights", "pretrained", "optimizer", "scheduler", "plan"]
        )
        self.backbone = create_backbone(
            backbone, "hub" if pretrained else weights, drop_rate, drop_path_rate
        )
        self.backbone = convert_backbone_norm(self.backbone, backbone_norm)
        self.mixup = (
            BatchMixup(num_classes, label_smoothing, **mixup) if mixup is not None else None
        )
        self.head = hydra.utils.instantiate(head)(self.backbone.num_features, num_classes)
        self.blocks = backbone_blocks(self.backbone)
        if channels_last:  # NHWC: faster convolutions on GPUs with tensor cores
            self.backbone.to(memory_format=torch.channels_last)
        if compile:  # in place: parameter names (and checkpoints) stay the same
            self.backbone.compile(mode=compile_mode(compile), backend=compile_backend)
        self._bn_params = batchnorm_param_names(self.backbone)
        self.optimizer_factory = optimizer
        self.scheduler_cfg = scheduler
        self._eval_bns: list[nn.Module] = []
        self._wrap_trainable: set[int] | None = None
        self.current_trainable = -1
        self.plan = plan or Plan("full", len(self.blocks), len(self.blocks))
        self.set_plan(self.plan)

        data_cfg = resolve_data_config({}, model=self.backbone)
        self.preprocessing = {
            "mean": [float(v) for v in data_cfg["mean"]],
            "std": [float(v) for v in data_cfg["std"]],
            "interpolation": data_cfg["interpolation"],
            "image_size": image_size,
            "crop_pct": crop_pct,
        }
        self.multilabel = task == "multilabel"
        self.train_acc: Metric
        if self.multilabel:
            self.train_acc = MultilabelAccuracy(num_classes, average="micro")
            self.val_metrics = multilabel_metrics(num_classes, "val")
            self.test_metrics = multilabel_metrics(num_classes, "test")
            # per-class decision thresholds, tuned on the validation split after training
            self.register_buffer("thresholds", torch.full((num_classes,), 0.5))
        else:
            self.train_acc = MulticlassAccuracy(num_classes, average="micro")
            self.val_metrics = eval_metrics(num_classes, "val")
            self.test_metrics = eval_metrics(num_classes, "test")
        # data.balance=weighted_loss: per-class weights of the training loss (not saved:
        # they follow from the data, and inference does not need them)
        self.register_buffer("class_weights", None, persistent=False)

    # -- fine-tuning plan --------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def set_plan(self, plan: Plan) -> None:
        """Adopt a plan and apply its starting point (call before ``Trainer.fit``)."""
        if plan.total_blocks != self.num_blocks:
            raise ConfigError(
                f"plan is for {plan.total_blocks} blocks, backbone has {self.num_blocks}."
            )
        self.plan = plan
        self.apply_trainable(plan.trainable_blocks)

    def apply_trainable(self, k: int) -> None:
        """Make the last ``k`` blocks (and the head) trainable, freeze the rest for real:
        ``requires_grad=False`` and, per the plan's BatchNorm mode, statistics fixed."""
        names = trainable_names(self.blocks, k, self._bn_params, self.plan.bn_mode)
        for n, p in self.backbone.named_parameters():
            p.requires_grad_(n in names)
        for p in self.head.parameters():
            p.requires_grad_(True)
        self._eval_bns = list(
            frozen_stat_modules(
                self.backbone, self.blocks, k, self.plan.bn_mode, self.plan.trainable_bn_stats
            )
        )
        self.current_trainable = k
        if self.training:
            self.train()

    def train(self, mode: bool = True) -> ImageClassifier:
        """Like ``nn.Module.train``, but BatchNorm the plan freezes stays in eval mode."""
        super().train(mode)
        if mode:
            for m in self._eval_bns:
                m.eval()
        return self

    def set_channels_last(self, on: bool) -> None:
        """Switch the backbone (and the inputs it is given) to NHWC memory format, or back."""
        self.hparams["channels_last"] = bool(on)
        self.backbone.to(memory_format=torch.channels_last if on else torch.contiguous_format)

    # -- forward and steps --------------------------------------------------------------
    def use_cached_features(self, split: Any | None) -> None:
        """Train/validate/test on cached frozen-prefix outputs (``transferkit.caching``):
        the steps then run only the suffix and the head. ``None`` goes back to images."""
        self._feature_split = (split,) if split is not None else ()

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        split = getattr(self, "_feature_split", ())
        return self.head(split[0].suffix(x)) if split else self(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.get("channels_last") and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(x))

    def l1_penalty(self) -> torch.Tensor:
        """Σ|w| over the parameters ``l1_scope`` selects (trainable ones only)."""
        return sum(
            (p.abs().sum() for p in self.l1_parameters()),
            torch.zeros((), device=self.device),
        )

    def l1_parameters(self) -> list[nn.Parameter]:
        scope = self.hparams["l1_scope"]
        named = [(f"head.{n}", p) for n, p in self.head.named_parameters()]
        if scope != "head":
            named += [(f"backbone.{n}", p) for n, p in self.backbone.named_parameters()]
        out = [p for _, p in named if p.requires_grad]
        if scope == "weights":
            out = [p for p in out if p.ndim > 1]
        return out

    def set_class_weights(self, weights: Any | None) -> None:
        """Weigh the training loss per class (``data.balance=weighted_loss``); None: off."""
        self.class_weights = None if weights is None else torch.as_tensor(
            weights, dtype=torch.float32, device=self.device
        )  # fmt: skip

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.multilabel:
            return multilabel_loss(logits, y, self.hparams["multilabel_loss"])
        w = self.class_weights
        if y.ndim == 2:  # soft targets (mixup / cutmix, label smoothing already inside)
            per_class = -y * F.log_softmax(logits, dim=-1)
            return torch.sum(per_class if w is None else per_class * w, dim=-1).mean()
        return F.cross_entropy(logits, y, weight=w, label_smoothing=self.hparams["label_smoothing"])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        logits = self._logits(x)
        loss = self._loss(logits, y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        if self.hparams["l1"]:
            l1 = self.hparams["l1"] * self.l1_penalty()
            self.log("train/l1", l1, on_step=False, on_epoch=True, sync_dist=True)
            loss = loss + l1
        hard = y if self.multilabel else y.argmax(-1) if y.ndim == 2 else y
        self.train_acc.update(logits, hard)  # batch values are not needed: no extra compute
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        logits = self._logits(x)
        metrics = getattr(self, f"{stage}_metrics")
        if self.multilabel:
            self.log(f"{stage}/loss", multilabel_loss(logits, y), prog_bar=True, sync_dist=True)
            metrics[f"{stage}/map"].update(logits, y.long())
            metrics[f"{stage}/f1_macro"].update(self.decide(logits), y.long())
        else:
            self.log(f"{stage}/loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
            metrics.update(logits, y)
            record = getattr(self, "_val_record", None)  # finetune=auto's ValRecorder
            if stage == "val" and record is not None:
                record.append((logits.argmax(-1) == y).cpu())
        for name, metric in metrics.items():  # prefixed names; shared states copied across
            self.log(name, metric, prog_bar=name in (f"{stage}/acc", f"{stage}/map"))

    def monitorable(self) -> list[str]:
        """The validation values this model logs, which ``monitor`` may name."""
        return sorted(["val/loss", *(str(k) for k in self.val_metrics)])

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities: softmax, or (multi-label) independent sigmoids."""
        return logits.sigmoid() if self.multilabel else logits.softmax(-1)

    def decide(self, logits: torch.Tensor) -> torch.Tensor:
        """Multi-label: 0/1 per class, each at its threshold."""
        return (logits.sigmoid() >= self.thresholds).long()  # type: ignore[operator]

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.probabilities(self(x))

    # -- optimisation -------------------------------------------------------------------
    def configure_callbacks(self) -> list[L.Callback]:
        from transferkit.callbacks.unfreeze import FinetuneSchedule
        from transferkit.checkpoint_io import RNGState

        callbacks: list[L.Callback] = [FinetuneSchedule(), RNGState()]  # RNGState: same draws
        if self.hparams.get("compile"):
            if getattr(self, "_compile_watch", None) is None:  # one count over fit and test
                self._compile_watch = CompileWatch(graph_bound(len(self.plan.schedule)))
            callbacks.append(self._compile_watch)
        return callbacks

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ConfigError(
                "no optimizer configured; pass optimizer=partial(torch.optim.Adam, ...)"
            )
        kw = getattr(self.optimizer_factory, "keywords", {})
        lr = float(kw.get("lr", 1e-3))
        groups = param_groups(
            self.backbone,
            self.head,
            self.blocks,
            trainable_names(
                self.blocks, self.plan.max_trainable, self._bn_params, self.plan.bn_mode
            ),
            lr=lr,
            weight_decay=float(kw.get("weight_decay", 0.0)),
            layer_decay=self.plan.layer_decay,
            decay_norm_and_bias=self.hparams["decay_norm_and_bias"],
        )
        optimizer = self.optimizer_factory(groups)
        if not self.scheduler_cfg or self.scheduler_cfg.get("scheduler") is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_cfg["scheduler"](optimizer, total_steps=total)
        config = {"scheduler": scheduler, "interval": self.scheduler_cfg.get("interval", "step")}
        if self.scheduler_cfg.get("monitor"):
            config["monitor"] = self.scheduler_cfg["monitor"]
            if config["interval"] == "epoch":
                # Step on validation epochs only: between them the monitored value is stale,
                # and a plateau scheduler would count it as "no improvement".
                config["frequency"] = self.trainer.check_val_every_n_epoch or 1
        return {"optimizer": optimizer, "lr_scheduler": config}

    def on_fit_start(self) -> None:
        # What DDP saw as trainable when it wrapped the model: only these are all-reduced.
        self._wrap_trainable = {id(p) for p in self.parameters() if p.requires_grad}
        if self._eval_bns:  # Lightning warns about them; they are in eval mode on purpose
            rank_zero_info(
                f"{len(self._eval_bns)} BatchNorm layer(s) of frozen blocks stay in inference "
                f"mode on purpose (finetune.bn_mode={self.plan.bn_mode}): their statistics "
                "do not change"
            )

    def on_after_backward(self) -> None:
        """All-reduce gradients of parameters unfrozen after DDP wrapped the model.

        DDP only synchronises parameters that required grad at wrap time; without this,
        replicas drift apart after an unfreeze (Lightning's BackboneFinetuning does).

        Why here, after each backward, and not before the optimizer step: with a gradient
        scaler (``16-mixed``) Lightning unscales the gradients and checks them for inf/NaN
        right after the closure, before ``on_before_optimizer_step``. Reduced later, an
        overflow on one rank would be seen by that rank's check only: it skips the step and
        lowers its scale while the others step on non-finite gradients, and the replicas
        and their scalers drift apart. Reduced here, every rank's check sees the same
        gradients. With gradient accumulation each micro-batch is reduced: averaging is
        linear, so the accumulated gradient is the same average DDP computes. The LBFGS
        closure's re-evaluations are each reduced too.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        wrapped = self._wrap_trainable or set()
        late = [
            p
            for p in self.parameters()
            if p.requires_grad and p.grad is not None and id(p) not in wrapped
        ]
        if not late:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in late])  # type: ignore[union-attr]
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for p in late:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p))  # type: ignore[union-attr]
            offset += n

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["transferkit"] = {
            "plan": self.plan.as_dict(),
            "preprocessing": self.preprocessing,
            "class_names": self.hparams.get("class_names"),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The preprocessing the model was trained with wins over timm's current defaults.
        saved = checkpoint.get("transferkit", {}).get("preprocessing")
        if saved:
            self.preprocessing = dict(saved)
