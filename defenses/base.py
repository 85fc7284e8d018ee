"""The Defense interface every adapter implements; certifying ones return a ``Certificate``
(defined in ``bench.types``, importable from here)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.training import TrainConfig, batches, train_classifier
from bench.types import ABSTAIN, Certificate  # noqa: F401 (adapters import them from here)


class Defense:
    """Base of every defense adapter.

    A subclass sets ``name``, declares its parameters as a ``Params`` dataclass (the keys of
    ``--param KEY=VALUE``), and overrides what differs from standard training:

    - ``attack_model()``: the differentiable ``nn.Module`` (images in [0,1] -> logits) that
      attacks target; a randomized defense draws fresh noise on every call (``randomized = True``);
    - ``bpda_model()``: a differentiable approximation for BPDA, where ``attack_model()`` has
      steps autograd cannot differentiate (quantization, JPEG, a denoiser outside autograd);
    - ``training_loss(x, y)`` and ``after_step()``: hooks of the shared training loop;
    - ``predict(x)``: labels by the defense's own prediction rule;
    - ``certify(x)`` -> ``Certificate`` when ``certifies = True``;
    - ``state_dict()`` / ``load_state_dict()`` when the defense keeps state beside the model;
    - ``check_model(model, params)`` when the method needs more than any ``nn.Module`` mapping
      [0,1] images to logits (e.g. the zoo's ``normalize -> stem -> body`` split).

    ``model`` is a zoo model when a run builds the defense, or any outside ``nn.Module`` given to
    :meth:`wrap` (``bench.wrap``); ``pretrained`` is then True: the model arrived trained.
    """

    name: ClassVar[str] = ""
    randomized: ClassVar[bool] = False
    certifies: ClassVar[bool] = False
    eval_batch_size: ClassVar[int] = 128  # larger batches are slower per image on 2 CPU cores
    # The zoo model this defense uses when --model is not given (None: the dataset's default).
    default_model: ClassVar[str | None] = None

    @dataclass
    class Params:
        pass

    @classmethod
    def training_cost(cls, params: Any) -> float:
        """Work per training image relative to plain training (one forward and backward pass): a
        grid starts the costliest training first, so that no worker is left alone with it."""
        return 1.0

    def __init__(self, model: nn.Module, params: Any = None, device: str = "cpu"):
        self.model = model.to(device)
        self.params = params if params is not None else self.Params()
        self.device = device
        self.pretrained = False

    @classmethod
    def wrap(cls, model: nn.Module, params: Any = None, device: str = "cpu") -> "Defense":
        """This defense around an outside, trained ``model`` (images in [0,1] -> logits)."""
        params = params if params is not None else cls.Params()
        cls.check_model(model, params)
        defense = cls(model, params, device=device)
        defense.pretrained = True
        return defense

    @classmethod
    def check_model(cls, model: nn.Module, params: Any) -> None:
        """Raise a one-line ``BenchError`` when the method cannot use ``model``; any model by default."""

    # -- training ---------------------------------------------------------------------------
    def fit(self, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> None:
        """Train on a training split (images in [0,1], NCHW)."""
        train_classifier(
            self.model.parameters(), [self.model], x, y, config, self.training_loss, self.after_step, desc=self.name
        )

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.attack_model()(x), y)

    def after_step(self) -> None:
        pass

    # -- inference ----------------------------------------------------------------------------
    def attack_model(self) -> nn.Module:
        return self.model

    def bpda_model(self) -> nn.Module | None:
        """A differentiable approximation of ``attack_model()`` for BPDA attacks (``bpda-linf``,
        ``bpda-l2``; Athalye et al. 2018): the same forward pass, with gradients through a
        substitute for what autograd cannot differentiate, e.g.
        ``bench.attacks.audit.StraightThrough(preprocess, classifier)``. None: no approximation."""
        return None

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        module = self.attack_model()
        return torch.cat(
            [module(x[i].to(self.device)).argmax(1).cpu() for i in batches(len(x), self.eval_batch_size)]
        )

    def certify(self, x: torch.Tensor) -> Certificate:
        raise NotImplementedError(f"defense {self.name} does not certify")

    def evaluate(self, x: torch.Tensor) -> tuple[torch.Tensor, Certificate | None]:
        """Predictions and, for certifying defenses, certificates; override to share the work."""
        return self.predict(x), (self.certify(x) if self.certifies else None)

    # -- persistence --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only: checkpoints are loaded with ``weights_only=True``."""
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.model.eval()
