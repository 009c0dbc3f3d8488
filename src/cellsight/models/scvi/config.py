"""Argument checks and the encoder/decoder configuration of the scVI module."""

from __future__ import annotations

from cellsight.checks import check_choice, check_fraction, check_int

__all__ = ["network_config", "check_choice", "check_fraction", "check_int", "check_module_args"]

LIKELIHOODS = ("nb", "zinb", "poisson")
DISPERSIONS = ("gene", "gene-batch", "gene-label", "gene-cell")
LATENTS = ("normal", "ln")

_NET_KEYS = ("n_hidden", "n_layers", "dropout_rate", "hidden_layers", "final_layer")


def network_config(
    config: dict | None, name: str, n_hidden: int, n_layers: int, dropout_rate: float
) -> tuple[int, int, float]:
    """``(n_hidden, n_layers, dropout_rate)`` of one network, from an optional config dict.

    Two forms are accepted:

    * ``{"n_hidden": 128, "n_layers": 2, "dropout_rate": 0.1}`` (any subset);
    * Cellarium's ``{"hidden_layers": [{"init_args": {"out_features": 128}}, ...],
      "final_layer": {...}}``: the number of entries is ``n_layers`` and their common
      ``out_features`` is ``n_hidden`` (scVI's fully-connected stacks have one width; other
      layer classes and per-layer widths are not supported and raise a ``ValueError``).

    Parameters
    ----------
    config
        The dict (``None``: the defaults).
    name
        ``"encoder"`` or ``"decoder"``, for messages.
    n_hidden, n_layers, dropout_rate
        Defaults.
    """
    if config is None:
        check_int(n_hidden, "n_hidden")
        check_int(n_layers, "n_layers")
        check_fraction(dropout_rate, "dropout_rate")
        return n_hidden, n_layers, dropout_rate
    if not isinstance(config, dict):
        raise ValueError(f"{name} must be a dict or None, got {type(config).__name__}.")
    unknown = set(config) - set(_NET_KEYS)
    if unknown:
        raise ValueError(
            f"{name} has unsupported key(s) {sorted(unknown)}; supported keys are "
            f"{list(_NET_KEYS)}."
        )
    n_hidden = int(config.get("n_hidden", n_hidden))
    n_layers = int(config.get("n_layers", n_layers))
    dropout_rate = float(config.get("dropout_rate", dropout_rate))
    layers = config.get("hidden_layers")
    if layers is not None:
        if not isinstance(layers, list) or len(layers) == 0:
            raise ValueError(f"{name}['hidden_layers'] must be a non-empty list of layer dicts.")
        widths = set()
        for layer in layers:
            args = layer.get("init_args", layer) if isinstance(layer, dict) else None
            if not isinstance(args, dict) or "out_features" not in args:
                raise ValueError(
                    f"each entry of {name}['hidden_layers'] needs init_args.out_features."
                )
            widths.add(int(args["out_features"]))
        if len(widths) != 1:
            raise ValueError(
                f"{name}['hidden_layers'] has widths {sorted(widths)}; scVI's layers share one "
                "width. Use equal out_features (or n_hidden=...)."
            )
        n_hidden, n_layers = widths.pop(), len(layers)
    if n_hidden < 1 or n_layers < 1:
        raise ValueError(f"{name}: n_hidden={n_hidden} and n_layers={n_layers} must be >= 1.")
    check_fraction(dropout_rate, f"{name} dropout_rate")
    return n_hidden, n_layers, dropout_rate


def check_module_args(
    *,
    gene_likelihood: str,
    dispersion: str,
    latent_distribution: str,
    input_gene_dropout_rate: float,
    kl_annealing_start: float,
    n_latent: int,
    n_batch: int,
    n_labels: int,
    z_kl_weight_max: float,
    batch_kl_weight_max: float,
    batch_embedded: bool,
    batch_representation_sampled: bool,
    n_latent_batch: int | None,
) -> None:
    """Reject inconsistent scVI module arguments with a ``ValueError`` saying what to change."""
    check_choice(gene_likelihood, LIKELIHOODS, "gene_likelihood")
    check_choice(dispersion, DISPERSIONS, "dispersion")
    check_choice(latent_distribution, LATENTS, "latent_distribution")
    check_fraction(input_gene_dropout_rate, "input_gene_dropout_rate")
    check_fraction(kl_annealing_start, "kl_annealing_start", upper_open=False)
    check_int(n_latent, "n_latent")
    if z_kl_weight_max < 0 or batch_kl_weight_max < 0:
        raise ValueError("z_kl_weight_max and batch_kl_weight_max must be >= 0.")
    if not batch_embedded:
        if batch_representation_sampled:
            raise ValueError(
                "batch_representation_sampled=True needs batch_embedded=True (a one-hot batch "
                "code cannot be sampled)."
            )
        if n_latent_batch is not None and n_latent_batch != n_batch:
            raise ValueError(
                f"n_latent_batch={n_latent_batch} differs from n_batch={n_batch} but the batch "
                "is one-hot encoded; pass batch_embedded=True to learn an embedding."
            )
    if dispersion == "gene-batch" and n_batch < 1:
        raise ValueError("dispersion='gene-batch' needs n_batch >= 1.")
    if dispersion == "gene-label" and n_labels < 1:
        raise ValueError("dispersion='gene-label' needs n_labels >= 1 (set up labels_key).")
