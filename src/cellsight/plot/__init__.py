from cellsight.plot.attributions import attribution_heatmap, ranked_features, volcano  # noqa: F401
from cellsight.plot.causal import (  # noqa: F401
    causal_train_losses,
    feature_weight_bars,
    information_flow_bars,
)
from cellsight.plot.fadvi import disentanglement_overview  # noqa: F401
from cellsight.plot.training import embedding, embedding_and_loss, loss_curves  # noqa: F401
