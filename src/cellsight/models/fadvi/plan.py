"""FADVI's training plan: the fast epoch-metrics plan with a faster time scale for adversaries.

With gradient reversal the encoders and the adversaries move in the same step; if the
adversaries learn no faster than the encoders, the encoders learn to fool the current
adversaries instead of removing the information (a fresh classifier then still reads it).
``adversary_lr_factor`` gives the adversaries' parameters a larger learning rate (two time
scales, as in Heusel et al. 2017), which keeps them closer to the best response to the current
latents at the cost of nothing but an optimiser parameter group. On the bundled PBMC data with
LayerNorm encoders a factor of 10-30 changed the batch predictability of ``z_l`` by less than
0.03 (it is at chance already), so the default is 1.

``adversarial_training="alternating"`` (FADVI's default) replaces gradient reversal by
alternating optimisation (Lightning manual optimisation, two Adam optimisers): each step first
updates the adversaries on the *detached* posterior means (their cross-entropy; no gradient
reaches the encoders), then updates everything else (encoders, decoder, supervised heads) on
the ELBO, the supervised and correlation terms and ``-sum(alpha * cross-entropy)`` of the
just-updated adversaries, whose parameters are frozen for that pass. The encoders' gradient is
the one reversal gives them; what differs is that the adversaries are one step ahead, and that
they are trained on their own optimiser (with ``adversary_lr_factor``). It costs a second,
small backward per step; see :class:`~cellsight.models.fadvi.FADVI` for the measured
comparison. The step counter advances twice per minibatch, so a step-based KL warm-up
(``n_steps_kl_warmup``) counts both steps; trainer-side gradient clipping is not available
(Lightning's manual optimisation).

Multi-process (DDP) training. DDP's reducer all-reduces the gradients of one backward pass per
forward; a step here has two backward passes, each for a different set of parameters, so the
plan runs each step with the reducer off (the strategy's ``block_backward_sync``, DDP's
``no_sync``: gradients stay local) and averages each pass's gradients over the ranks itself,
in one flat all-reduce, before its optimiser steps. The ranks start from the same weights
(DDP broadcasts them) and take identical steps, so they stay identical, as under DDP.

The step itself. When the module is in FADVI's default configuration and the native kernels
are available (:func:`~cellsight.models.fadvi.fast_step.fast_step_reason`), a step's loss and
gradients come from :class:`~cellsight.models.fadvi.fast_step.FastTrainingStep` (the same
numbers, written-out gradients, no autograd graph); with gradient reversal it runs in
Lightning's ``backward`` hook, so gradient clipping and the other hooks work as usual, and only
in single-process training (DDP's reducer needs autograd's hooks); with alternating
optimisation it also runs under DDP (the plan averages the gradients itself). ``fast_step=False``
keeps autograd.

``reduce_lr_on_plateau`` gives each optimiser a ``ReduceLROnPlateau`` scheduler with the
plan's ``lr_*`` settings, stepped once per training epoch on ``lr_scheduler_metric`` (as
Lightning steps the scheduler of an automatically optimised plan).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from cellsight.models.fadvi.fast_step import FastTrainingStep, fast_step_reason
from cellsight.train import EpochMetricsTrainingPlan

__all__ = ["FADVITrainingPlan"]


class FADVITrainingPlan(EpochMetricsTrainingPlan):
    """:class:`~cellsight.train.EpochMetricsTrainingPlan` with the adversaries'
    learning rate multiplied by ``adversary_lr_factor`` (other parameters as scvi-tools'), and
    gradient reversal (``adversarial_training="reversal"``) or alternating optimisation
    (``"alternating"``) of the adversaries (see the module notes)."""

    def __init__(
        self, module, adversary_lr_factor: float = 1.0, adversarial_training: str = "alternating",
        fast_step: bool = True, **kwargs,
    ) -> None:
        if not adversary_lr_factor > 0:
            raise ValueError(f"adversary_lr_factor={adversary_lr_factor} must be > 0.")
        if adversarial_training not in ("reversal", "alternating"):
            raise ValueError(
                f"adversarial_training={adversarial_training!r} must be 'reversal' or "
                "'alternating'."
            )
        super().__init__(module, **kwargs)
        self.adversary_lr_factor = float(adversary_lr_factor)
        self.adversarial_training = adversarial_training
        # without adversaries there is nothing to alternate
        self.alternating = (
            adversarial_training == "alternating"
            and getattr(module, "adversaries", None) is not None
        )
        if self.alternating:
            self.automatic_optimization = False
            self.loss_kwargs["adversarial"] = "frozen"  # validation scores the same objective
        self.fast_step = bool(fast_step)
        self._fast: FastTrainingStep | None = None
        self._fast_checked = False
        self._pending_backward = None

    def _fast_training_step(self) -> FastTrainingStep | None:
        """The written-out training step, when it covers this module and run (see the module
        notes); ``None``: autograd."""
        if not self._fast_checked:
            self._fast_checked = True
            extra = set(self.loss_kwargs) - {"kl_weight", "adversarial"}
            if self.fast_step and not extra and fast_step_reason(self.module) is None:
                self._fast = FastTrainingStep(self.module)
        if self._fast is None or not torch.is_grad_enabled() or not self.module.training:
            return None
        if not self.alternating and self.trainer.world_size > 1:
            return None
        return self._fast

    def backward(self, loss, *args, **kwargs) -> None:
        """Lightning's backward hook: the written-out gradients of a fast step, else
        autograd's."""
        pending, self._pending_backward = self._pending_backward, None
        if pending is None:
            return super().backward(loss, *args, **kwargs)
        pending()
        return None

    def _adversary_ids(self) -> set[int]:
        return {id(p) for p in self.module.adversaries.parameters()}

    def _main_params(self) -> list[torch.nn.Parameter]:
        adv_ids = self._adversary_ids()
        return [p for p in self.module.parameters() if p.requires_grad and id(p) not in adv_ids]

    def get_optimizer_creator(self):
        base = super().get_optimizer_creator()
        adversaries = getattr(self.module, "adversaries", None)
        if self.alternating or self.adversary_lr_factor == 1.0 or adversaries is None:
            return base
        adv_ids = self._adversary_ids()

        def create(params):
            params = list(params)
            groups = [
                {"params": [p for p in params if id(p) not in adv_ids]},
                {"params": [p for p in params if id(p) in adv_ids],
                 "lr": self.lr * self.adversary_lr_factor},
            ]
            return base([g for g in groups if g["params"]])

        return create

    def configure_optimizers(self):
        if not self.alternating:
            return super().configure_optimizers()
        create = self.get_optimizer_creator()
        main = create(self._main_params())
        adversary = create([{"params": list(self.module.adversaries.parameters()),
                             "lr": self.lr * self.adversary_lr_factor}])
        if not self.reduce_lr_on_plateau:
            return [main, adversary]
        schedulers = [
            ReduceLROnPlateau(opt, patience=self.lr_patience, factor=self.lr_factor,
                              threshold=self.lr_threshold, min_lr=self.lr_min,
                              threshold_mode="abs")
            for opt in (main, adversary)
        ]
        return [main, adversary], schedulers

    # ------------------------------------------------------------------ manual DDP
    def _average_gradients(self, optimizer) -> None:
        """Mean of the gradient of each of ``optimizer``'s parameters over the DDP ranks (one
        flat all-reduce); a parameter without a gradient on this rank contributes zeros."""
        if self.trainer.world_size <= 1:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.trainer.strategy.reduce(flat, reduce_op="mean")
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p)
            offset += n

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if not (self.alternating and self.reduce_lr_on_plateau):
            return
        metric = self.trainer.callback_metrics.get(self.lr_scheduler_metric)
        if metric is None:
            raise ValueError(
                f"reduce_lr_on_plateau monitors {self.lr_scheduler_metric!r}, which is not "
                f"available after epoch {self.current_epoch} (metrics: "
                f"{sorted(self.trainer.callback_metrics)}). Validate every epoch "
                "(check_val_every_n_epoch=1) or set lr_scheduler_metric to a training metric."
            )
        for scheduler in self.lr_schedulers():
            scheduler.step(float(metric))

    def training_step(self, batch, batch_idx):
        if not self.alternating:
            fast = self._fast_training_step()
            if fast is None:
                return super().training_step(batch, batch_idx)
            out, self._pending_backward = fast(batch, kl_weight=self.kl_weight,
                                               adversarial="reversal")
            self._end_step(out, batch_idx)
            return out.loss
        main_opt, adversary_opt = self.optimizers()
        module = self.module
        if "kl_weight" in self.loss_kwargs:
            self.loss_kwargs["kl_weight"] = self.kl_weight
        with self._local_gradients():
            return self._alternating_step(batch, batch_idx, module, main_opt, adversary_opt)

    def _local_gradients(self):
        """DDP's reducer off for this step (the plan averages the gradients itself)."""
        if self.trainer.world_size > 1:
            return self.trainer.strategy.block_backward_sync()
        return contextlib.nullcontext()

    def _end_step(self, out, batch_idx) -> None:
        self._accumulate("train", out)
        n_batches = self.trainer.num_training_batches
        if math.isfinite(n_batches) and batch_idx + 1 >= n_batches:
            self._log_epoch("train")

    def _alternating_step(self, batch, batch_idx, module, main_opt, adversary_opt):
        fast = self._fast_training_step()
        if fast is not None:
            def adversary_step(compute) -> None:
                adversary_opt.zero_grad(set_to_none=True)
                compute()
                self._average_gradients(adversary_opt)
                adversary_opt.step()

            out, backward = fast(batch, kl_weight=self.kl_weight, adversarial="frozen",
                                 adversary_step=adversary_step)
            main_opt.zero_grad(set_to_none=True)
            backward()
            self._average_gradients(main_opt)
            main_opt.step()
            self._end_step(out, batch_idx)
            return out.loss
        inference_outputs, generative_outputs = module(batch, compute_loss=False)
        # 1. the adversaries, on the detached latents of the current encoders
        adversary_params = list(module.adversaries.parameters())
        adversary_opt.zero_grad(set_to_none=True)
        self.manual_backward(module.adversary_loss(batch, inference_outputs))
        self._average_gradients(adversary_opt)
        adversary_opt.step()
        # 2. everything else, against the updated adversaries (frozen: no gradient for them)
        for p in adversary_params:
            p.requires_grad_(False)
        try:
            out = module.loss(batch, inference_outputs, generative_outputs, **self.loss_kwargs)
        finally:
            for p in adversary_params:
                p.requires_grad_(True)
        main_opt.zero_grad(set_to_none=True)
        self.manual_backward(out.loss)
        self._average_gradients(main_opt)
        main_opt.step()
        self._end_step(out, batch_idx)
        return out.loss.detach()
