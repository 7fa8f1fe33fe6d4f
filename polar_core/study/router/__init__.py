"""The router: predict a program of layers for a prompt (PoLar's predictor).

Shape of the network, after the paper (arXiv 2606.06574, section 4):

    prompt tokens -> frozen features of the base model (T, F)
      -> LayerNorm, linear to d=256, + a position embedding counted from the
         prompt's end                                              # (T, d)
      -> D learned per-layer queries cross-attend to the tokens     # (D, d)
      -> 2 transformer blocks over the layer axis                  # (D, d)
      -> boundary head (D logits: "a segment starts at layer i")
         and op head (D x 3: skip / keep / repeat for the segment
         starting at layer i)

The frozen features are the base model's own hidden states over the prompt
at an early depth (``RouterConfig.feature_layer``: 0 = the token embeddings,
k = after layers 0..k-1), so nothing beyond the model itself is needed offline.

A program is read off the heads as a segmentation of the D layers into
segments of at most ``max_segment`` layers, each skipped, kept or repeated
(run twice). Decoding is a beam search over segmentations and ops and always
yields valid Programs (``Program.from_ops``), ranked by their log-probability.

A prompt unlike every training prompt (the router keeps a summary of each)
gets the full program as its top-1 (``familiarity``): the router promises
no skip where it learned nothing.

Checkpoints are a folder with ``config.json`` (RouterConfig) and
``model.safetensors``; never pickle.
"""
from polar_core.study.router.checkpoint import (
    CONFIG_FILE,
    check_compatible,
    default_router_path,
    load_default_router,
    load_router,
    save_router,
)
from polar_core.study.router.config import RouterConfig, RouterError
from polar_core.study.router.familiarity import fit_familiarity
from polar_core.study.router.network import Router
from polar_core.study.router.predict import Routed, beam_search, predict_batch, predict_programs, route_batch
from polar_core.study.router.train import train_router

__all__ = [
    "CONFIG_FILE",
    "Router",
    "RouterConfig",
    "RouterError",
    "Routed",
    "beam_search",
    "check_compatible",
    "default_router_path",
    "fit_familiarity",
    "load_default_router",
    "load_router",
    "predict_batch",
    "predict_programs",
    "route_batch",
    "save_router",
    "train_router",
]
