from cellsight.plot.attributions import attribution_heatmap, ranked_features, volcano  # noqa: F401
from cellsight.plot.training import embedding, embedding_and_loss, loss_curves  # noqa: F401
