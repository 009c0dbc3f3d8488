"""cellsight: interpretable, causal and scalable deep learning for single-cell and spatial omics."""

__version__ = "0.1.0"
