"""The CauTrigger module (the maths): a dual VAE that splits features into a causal stream.

One module serves both models: without downstream features (``n_down=0``) it is the
one-layer model (upstream -> state), with them the two-layer one (upstream -> downstream ->
state).

* **Input.** ``x_ng`` (counts or non-negative expression) is ``log1p``-transformed and
  standardised with per-feature statistics of the registered cells (no labels used; buffers
  ``mean_g``, ``std_g``): ``xt_ng``. Everything the interpretation explains is a function of
  ``xt_ng``. During training the encoders see ``xt + input_noise * N(0, 1)`` (denoising).
* **Feature split.** Gates ``w_ng`` in (0, 1): one learnable logit per feature
  (``feature_mapper="gate"``) or per cell from a small attention network over ``xt_ng``
  (``"attention"``), optionally with a learnable soft threshold below which a gate is ~0.
  The causal stream sees ``xt * w``, the spurious stream ``xt * (1 - w)``.
* **Encoders.** ``q(z_c | xt w)`` (``n_causal`` dims) and ``q(z_s | xt (1 - w))``
  (``n_latent - n_causal`` dims), Gaussian, prior ``N(0, I)``.
* **Decoders.** ``z_c`` reconstructs the causal part ``xt w``, ``z_s`` the spurious part
  ``xt (1 - w)`` (their sum is ``xt``); in the two-layer model a decoder from ``[z_c, z_s]``
  reconstructs the standardised ``log1p`` downstream features.
* **DPD** (state classifier): predicts the state from the decoded representation, the
  reconstructed downstream features (two-layer) or the reconstructed upstream features
  (one-layer).
* **Causal path.** ``z_s`` replaced by its minibatch mean (when explaining: by its mean over
  the training cells, buffer ``z_s_mean_k``, so the explained function treats cells
  independently).

Losses (``loss``), all on a per-feature scale: reconstruction (mean squared error of the
standardised features), KL divided by the number of features, mean gate (L1 norm /
features), state classification of the causal path (the full path is tied to it by the
fidelity term, so that no loss rewards state information in ``z_s``), fidelity
``KL(p_full || p_causal)`` and the information-flow causal loss
``-causal_fold * I(z_c; Y) + spurious_fold * I(z_s; Y)`` estimated on ``n_x`` cells by
:func:`cellsight.interpret.information_flow.information_flow` (all ``n_alpha x n_beta``
latent draws in one batched pass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from scvi.nn import Encoder, FCLayers
from torch import nn
from torch.distributions import Normal, kl_divergence

from cellsight.interpret.information_flow import information_flow

__all__ = ["CauTriggerModule", "DOWN_KEY", "LOSS_TERMS"]

DOWN_KEY = "X_down"
GATE_SCALE = 5.0
LOSS_TERMS = ("recons", "kl", "feat_l1", "dpd", "fide_kl", "causal")


def _mlp(n_in: int, n_out: int, n_hidden: int, n_layers: int, dropout: float) -> nn.Module:
    return nn.Sequential(
        FCLayers(n_in, n_hidden, n_layers=n_layers, n_hidden=n_hidden, dropout_rate=dropout,
                 use_batch_norm=False, use_layer_norm=False),
        nn.Linear(n_hidden, n_out),
    )


class CauTriggerModule(BaseModuleClass):
    """Dual VAE with a causal and a spurious stream (see the module docstring).

    Parameters
    ----------
    n_input
        Upstream features.
    n_state
        States (classes) of the DPD.
    n_latent, n_causal
        Total latent dimensions and how many of them are causal (``z_c``).
    n_down
        Downstream features (0: the one-layer model).
    n_hidden, n_layers, dropout_rate
        Width, depth and dropout of every network.
    feature_mapper
        ``"gate"`` (one learnable gate per feature) or ``"attention"`` (per-cell gates from a
        network over the input).
    gate_threshold
        Learn a soft threshold below which gates are pushed to 0.
    gate_init
        Initial gate value (the sigmoid of the initial logits).
    log1p
        ``log1p``-transform the inputs before standardising (``False`` for data already on a
        log scale).
    input_noise
        Standard deviation of Gaussian noise added to the standardised inputs of the encoders
        during training (denoising). With ~1,000 cells and ~100 features the causal encoder
        otherwise memorises the training cells (training accuracy ~0.95 against ~0.6 held
        out on the cascade simulator) and its gradients, which every score explains, become
        noisy; 1.0 raised the grid AUROC of the scores (see ``benchmarks/cautrigger_grid.py``).
    """

    def __init__(
        self,
        n_input: int,
        n_state: int,
        n_latent: int = 10,
        n_causal: int = 2,
        n_down: int = 0,
        n_hidden: int = 64,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        feature_mapper: str = "gate",
        gate_threshold: bool = False,
        gate_init: float = 0.5,
        log1p: bool = True,
        input_noise: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0 < n_causal < n_latent:
            raise ValueError(
                f"n_causal={n_causal} must be between 1 and n_latent - 1 = {n_latent - 1} "
                "(both the causal and the spurious latent need at least one dimension)."
            )
        if feature_mapper not in ("gate", "attention"):
            raise ValueError(f"feature_mapper={feature_mapper!r} must be 'gate' or 'attention'.")
        if not 0 < gate_init < 1:
            raise ValueError(f"gate_init={gate_init} must be in (0, 1).")
        self.n_input, self.n_state, self.n_down = n_input, n_state, n_down
        self.n_latent, self.n_causal = n_latent, n_causal
        self.n_spurious = n_latent - n_causal
        if input_noise < 0:
            raise ValueError(f"input_noise={input_noise} must be >= 0.")
        self.feature_mapper, self.log1p = feature_mapper, log1p
        self.input_noise = float(input_noise)
        init = torch.logit(torch.tensor(float(gate_init)))
        # gate logits are GATE_SCALE * parameter: Adam moves a parameter by about lr per step,
        # too slowly for a logit that must travel several units in a few hundred steps
        self.gate_logit_g = nn.Parameter(torch.full((n_input,), float(init) / GATE_SCALE))
        self.attention = None
        if feature_mapper == "attention":
            self.attention = _mlp(n_input, n_input, n_hidden, 1, 0.0)
            nn.init.zeros_(self.attention[-1].weight)
            nn.init.constant_(self.attention[-1].bias, float(init))
        self.threshold_logit = nn.Parameter(torch.tensor(-3.0)) if gate_threshold else None
        enc = dict(n_layers=n_layers, n_hidden=n_hidden, dropout_rate=dropout_rate,
                   return_dist=True, use_batch_norm=False, use_layer_norm=False)
        self.encoder_c = Encoder(n_input, n_causal, **enc)
        self.encoder_s = Encoder(n_input, self.n_spurious, **enc)
        self.decoder_c = _mlp(n_causal, n_input, n_hidden, n_layers, 0.0)
        self.decoder_s = _mlp(self.n_spurious, n_input, n_hidden, n_layers, 0.0)
        self.decoder_down = _mlp(n_latent, n_down, n_hidden, n_layers, 0.0) if n_down else None
        self.dpd = _mlp(n_down or n_input, n_state, n_hidden, 1, dropout_rate)
        for name, size in (("mean_g", n_input), ("std_g", n_input), ("down_mean_d", n_down),
                           ("down_std_d", n_down)):
            self.register_buffer(name, torch.zeros(size) if "mean" in name else torch.ones(size))
        self.register_buffer("z_s_mean_k", torch.zeros(self.n_spurious))
        self.register_buffer("class_weight_c", torch.ones(n_state))

    # ------------------------------------------------------------------ pieces
    def transform(self, x_ng: torch.Tensor) -> torch.Tensor:
        """Standardised (log1p) input ``xt_ng``."""
        x = torch.log1p(x_ng) if self.log1p else x_ng
        return (x - self.mean_g) / self.std_g

    def transform_down(self, x_nd: torch.Tensor) -> torch.Tensor:
        """Standardised (log1p) downstream features."""
        x = torch.log1p(x_nd) if self.log1p else x_nd
        return (x - self.down_mean_d) / self.down_std_d

    def gates(self, xt_ng: torch.Tensor) -> torch.Tensor:
        """Gates ``w_ng`` in (0, 1) for standardised inputs (broadcast over cells for
        ``"gate"``)."""
        if self.attention is not None:
            logit = self.attention(xt_ng)
        else:
            logit = (GATE_SCALE * self.gate_logit_g).expand(xt_ng.shape[0], -1)
        w = torch.sigmoid(logit)
        if self.threshold_logit is not None:
            thr = 0.5 * torch.sigmoid(self.threshold_logit)
            w = w * torch.sigmoid((w - thr) / 0.02)
        return w

    def decode(self, z_c: torch.Tensor, z_s: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reconstructions and DPD logits from latents (rows independent)."""
        rec_c = self.decoder_c(z_c)
        rec_s = self.decoder_s(z_s)
        out = {"rec_c_ng": rec_c, "rec_s_ng": rec_s}
        if self.decoder_down is not None:
            down = self.decoder_down(torch.cat([z_c, z_s], -1))
            out["down_nd"] = down
            out["logits_nc"] = self.dpd(down)
        else:
            out["logits_nc"] = self.dpd(rec_c + rec_s)
        return out

    def decode_logits(self, z_c: torch.Tensor, z_s: torch.Tensor) -> torch.Tensor:
        """DPD logits from latents, computing only what the DPD reads."""
        if self.decoder_down is not None:
            return self.dpd(self.decoder_down(torch.cat([z_c, z_s], -1)))
        return self.dpd(self.decoder_c(z_c) + self.decoder_s(z_s))

    def predict_proba_from_latent(self, z_nk: torch.Tensor) -> torch.Tensor:
        """State probabilities from full latent vectors ``[z_c, z_s]`` (for information flow)."""
        return torch.softmax(
            self.decode_logits(z_nk[:, : self.n_causal], z_nk[:, self.n_causal :]), -1
        )

    def causal_logits(self, xt_ng: torch.Tensor) -> torch.Tensor:
        """Logits of the causal path for standardised inputs: ``z_c`` at its posterior mean,
        ``z_s`` at its training mean (the function every score explains)."""
        w = self.gates(xt_ng)
        qc, _ = self.encoder_c(xt_ng * w)
        z_s = self.z_s_mean_k.expand(xt_ng.shape[0], -1)
        return self.decode_logits(qc.loc, z_s)

    def down_from_input(self, xt_ng: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """Decoded (standardised) downstream features for standardised inputs, at posterior
        means (``causal``: ``z_s`` at its training mean)."""
        if self.decoder_down is None:
            raise ValueError("This is a one-layer model: it has no downstream decoder.")
        w = self.gates(xt_ng)
        qc, _ = self.encoder_c(xt_ng * w)
        if causal:
            z_s = self.z_s_mean_k.expand(xt_ng.shape[0], -1)
        else:
            z_s = self.encoder_s(xt_ng * (1 - w))[0].loc
        return self.decoder_down(torch.cat([qc.loc, z_s], -1))

    def latent_from_input(self, xt_ng: torch.Tensor) -> torch.Tensor:
        """Posterior means ``[z_c, z_s]`` for standardised inputs."""
        w = self.gates(xt_ng)
        qc, _ = self.encoder_c(xt_ng * w)
        qs, _ = self.encoder_s(xt_ng * (1 - w))
        return torch.cat([qc.loc, qs.loc], -1)

    # ------------------------------------------------------------------ scvi contract
    def _get_inference_input(self, tensors: dict) -> dict:
        return {"x_ng": tensors[REGISTRY_KEYS.X_KEY]}

    def _get_generative_input(self, tensors: dict, inference_outputs: dict) -> dict:
        return {"z_c": inference_outputs["z_c"], "z_s": inference_outputs["z_s"]}

    @auto_move_data
    def inference(self, x_ng: torch.Tensor, use_latent_mean: bool = False) -> dict:
        xt = self.transform(x_ng)
        w = self.gates(xt)
        xin = xt
        if self.training and self.input_noise > 0:  # denoising: a ridge-like regulariser
            xin = xt + self.input_noise * torch.randn_like(xt)
        qc, z_c = self.encoder_c(xin * w)
        qs, z_s = self.encoder_s(xin * (1 - w))
        if use_latent_mean:
            z_c, z_s = qc.loc, qs.loc
        return {"xt_ng": xt, "w_ng": w, "qz_c": qc, "qz_s": qs, "z_c": z_c, "z_s": z_s,
                "z": torch.cat([z_c, z_s], -1)}

    @auto_move_data
    def generative(self, z_c: torch.Tensor, z_s: torch.Tensor) -> dict:
        out = self.decode(z_c, z_s)
        z_s_bar = z_s.mean(0, keepdim=True).expand_as(z_s)  # the causal path: z_s at its mean
        out["causal_logits_nc"] = self.decode_logits(z_c, z_s_bar)
        return out

    def _class_loss(self, logits_nc: torch.Tensor, y_n: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_nc, y_n, weight=self.class_weight_c, reduction="none")

    def causal_loss(
        self,
        qz_c: Normal,
        qz_s: Normal,
        n_x: int,
        n_alpha: int,
        n_beta: int,
        causal_fold: float = 1.0,
        spurious_fold: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``-causal_fold I(z_c; Y) + spurious_fold I(z_s; Y)`` on the first ``n_x`` cells.

        Returns the loss and the two mean information flows (nats).
        """
        m = min(int(n_x), qz_c.loc.shape[0])
        mu = torch.cat([qz_c.loc[:m], qz_s.loc[:m]], -1)
        std = torch.cat([qz_c.scale[:m], qz_s.scale[:m]], -1)
        dims_c = list(range(self.n_causal))
        dims_s = list(range(self.n_causal, self.n_latent))
        f = self.predict_proba_from_latent
        i_c = information_flow(f, mu, std, dims_c, n_alpha=n_alpha, n_beta=n_beta).mean()
        i_s = information_flow(f, mu, std, dims_s, n_alpha=n_alpha, n_beta=n_beta).mean()
        return -causal_fold * i_c + spurious_fold * i_s, i_c, i_s

    def loss(
        self,
        tensors: dict,
        inference_outputs: dict,
        generative_outputs: dict,
        weights: dict[str, float] | None = None,
        up_weight: float = 1.0,
        down_weight: float = 1.0,
        down_fold: float = 1.0,
        causal_fold: float = 1.0,
        spurious_fold: float = 1.0,
        n_x: int = 5,
        n_alpha: int = 25,
        n_beta: int = 100,
        kl_weight: float | None = None,
    ) -> LossOutput:
        """All training losses (see the module docstring); ``weights`` maps each name of
        :data:`LOSS_TERMS` to its weight for this step."""
        w = {t: 1.0 for t in LOSS_TERMS} | dict(weights or {})
        inf, gen = inference_outputs, generative_outputs
        xt, gate = inf["xt_ng"], inf["w_ng"]
        g = gate.detach()  # the targets: the reconstruction does not move the split itself
        # mean squared errors (per feature) of the standardised features
        rec_n = up_weight * (
            (gen["rec_c_ng"] - xt * g).pow(2).mean(-1)
            + (gen["rec_s_ng"] - xt * (1 - g)).pow(2).mean(-1)
        )
        if self.decoder_down is not None:
            down_t = self.transform_down(tensors[DOWN_KEY])
            rec_n = rec_n + down_weight * down_fold * (gen["down_nd"] - down_t).pow(2).mean(-1)
        prior = Normal(0.0, 1.0)
        # per input feature, on the scale of the mean squared reconstruction error
        kl_n = (kl_divergence(inf["qz_c"], prior).sum(-1)
                + kl_divergence(inf["qz_s"], prior).sum(-1)) / (self.n_input + self.n_down)
        l1 = gate.mean()  # L1 norm of the (positive) gates / n_features, mean over cells
        y = tensors[REGISTRY_KEYS.LABELS_KEY].reshape(-1).long()
        logits, c_logits = gen["logits_nc"], gen["causal_logits_nc"]
        # the state is learnt through the causal path only; the full path follows it through
        # the fidelity term, so no loss rewards state information in z_s
        dpd_n = self._class_loss(c_logits, y)
        logp = torch.log_softmax(logits, -1)
        fide_n = (logp.exp() * (logp - torch.log_softmax(c_logits, -1))).sum(-1)
        zero = torch.zeros((), device=xt.device)
        causal, i_c, i_s = zero, zero, zero
        if w["causal"] > 0 and n_x > 0:
            causal, i_c, i_s = self.causal_loss(
                inf["qz_c"], inf["qz_s"], n_x, n_alpha, n_beta, causal_fold, spurious_fold
            )
        total = (
            w["recons"] * rec_n.mean() + w["kl"] * kl_n.mean() + w["feat_l1"] * l1
            + w["dpd"] * dpd_n.mean() + w["fide_kl"] * fide_n.mean() + w["causal"] * causal
        )
        acc = (c_logits.argmax(-1) == y).float().mean()  # of the causal path
        extra = {
            "recons_loss": rec_n.mean().detach(), "kl_loss": kl_n.mean().detach(),
            "feat_l1_loss": l1.detach(), "dpd_loss": dpd_n.mean().detach(),
            "fide_kl_loss": fide_n.mean().detach(), "causal_loss": causal.detach(),
            "info_causal": i_c.detach(), "info_spurious": i_s.detach(), "accuracy": acc.detach(),
        }
        return LossOutput(loss=total, reconstruction_loss=rec_n, kl_local=kl_n,
                          extra_metrics=extra)
