"""Decoded expression of the models with scVI's decoder (SCVI, FADVI), written once.

:class:`ExpressionMixin` turns AnnData cells into ``rho`` (the decoder's expression
frequencies) scaled to a library size: minibatches, posterior samples, decoding in fixed
batches, gene selection, the sample draw of ``n_samples_overall`` and the DataFrame with cell
and gene names. Each model keeps its own public ``get_normalized_expression`` (its seed's
signature, defaults and docstring) as a one-line call to :meth:`_normalized_expression`.

The models differ only in which ``transform_batch`` values they accept: SCVI takes a batch
name, a list of names or ``"mean"`` (decoded in each and averaged, as scvi-tools), FADVI one
batch name or code (as ``fadvi``). That is the hook :meth:`ExpressionMixin._batch_codes`. How
the module decodes needs no hook: FADVI's module is a subclass of SCVI's whose ``inference``
returns the concatenated ``z_nk = [z_b, z_l, z_r]`` that SCVI's ``generative`` decodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from cellsight.checks import check_int, check_number

__all__ = ["ExpressionMixin"]


class ExpressionMixin:
    """Normalised expression for a :class:`~cellsight.models.base.BaseModel` whose module is
    (a subclass of) :class:`~cellsight.models.scvi.module.SingleCellVariationalInference`.

    Use it before ``BaseModel`` among the bases (it reads ``module``, ``var_names``, ``seed``,
    ``_seeded``, ``_loader`` and ``_obs_names``) and implement :meth:`_batch_codes`.
    """

    def _batch_codes(self, transform_batch: Any) -> list[int | None]:  # pragma: no cover
        """Batch codes to decode every cell in, averaged (``[None]``: each cell's own batch).

        Validates ``transform_batch`` with a helpful ``ValueError``.
        """
        raise NotImplementedError

    def _gene_positions(self, gene_list: Sequence[str] | None) -> np.ndarray | None:
        """Positions of the genes named in ``gene_list`` (one name or several; ``None``: all)."""
        if gene_list is None:
            return None
        genes = pd.Index([gene_list] if isinstance(gene_list, str) else list(gene_list))
        pos = self.var_names.get_indexer(genes)
        if (pos < 0).any():
            missing = list(genes[pos < 0][:5])
            raise ValueError(
                f"gene_list has {int((pos < 0).sum())} gene(s) the model does not know "
                f"({missing}); pick genes from model.var_names."
            )
        return pos

    def _normalized_expression(
        self,
        adata: AnnData | None,
        indices: Sequence[int] | None,
        transform_batch: Any,
        gene_list: Sequence[str] | None,
        library_size: float | Literal["latent"],
        n_samples: int,
        return_mean: bool,
        return_numpy: bool | None,
        batch_size: int | None,
        n_samples_overall: int | None = None,
    ) -> pd.DataFrame | np.ndarray:
        """``get_normalized_expression`` (arguments as there; ``n_samples_overall`` as FADVI's).

        Errors are raised in the order: ``library_size``, ``n_samples``, ``transform_batch``,
        ``gene_list``, ``n_samples_overall``. Sampling is seeded with the model's seed; with
        several batch codes every code decodes fresh posterior samples, in order.
        """
        if library_size != "latent":
            check_number(library_size, "library_size", positive=True, what=(
                "1: frequencies, 1e4: counts per 10,000; or 'latent', each cell's own library "
                "size"))
        check_int(n_samples, "n_samples")
        codes = self._batch_codes(transform_batch)
        genes = self._gene_positions(gene_list)
        if n_samples_overall is not None:
            check_int(n_samples_overall, "n_samples_overall")
            n_cells = len(self._obs_names(adata, indices))
            n_samples = max(1, int(n_samples_overall) // max(n_cells, 1) + 1)
            return_mean = False
        key = "mu" if library_size == "latent" else "scale"
        scaling = 1.0 if library_size == "latent" else float(library_size)
        chunks = []
        with self._seeded():
            for tensors in self._loader(adata, indices, batch_size):
                acc = 0.0
                for code in codes:
                    _, gen = self.module(
                        tensors,
                        inference_kwargs={"n_samples": n_samples},
                        generative_kwargs={"transform_batch": code},
                        compute_loss=False,
                    )
                    expr = gen["px"].get_normalized(key) * scaling
                    acc = acc + (expr if genes is None else expr[..., genes]) / len(codes)
                chunks.append(acc.cpu())
        expr = torch.cat(chunks, dim=1 if n_samples > 1 else 0).numpy()
        if n_samples_overall is not None:
            flat = expr.reshape(-1, expr.shape[-1])
            rows = np.random.default_rng(self.seed).choice(
                len(flat), int(n_samples_overall), replace=True
            )
            return flat[rows]
        if n_samples > 1 and return_mean:
            expr = expr.mean(0)
        if return_numpy or expr.ndim == 3:
            return expr
        columns = self.var_names if genes is None else self.var_names[genes]
        return pd.DataFrame(expr, index=self._obs_names(adata, indices), columns=columns)
