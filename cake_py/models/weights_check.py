"""A model's weights checked against its config before anything is loaded: every tensor there, readable, of the shape
the config gives it, and no layer past the config's last, from the files' headers alone. Found later, when a stage
loads, a bad tensor cost the served model (POST /models/load drops it first) or left a cluster's first workers
holding their layers of a model a later worker refused."""

from __future__ import annotations

import torch

from cake_py.errors import WeightsError
from cake_py.models.config import ModelConfig
from cake_py.models.weights import LAYER_PATTERN, WeightSource, build_transformer, stage_tensor_names


def check_weights(source: WeightSource, config: ModelConfig) -> None:
    """WeightsError unless `source` holds every tensor of the whole model, in a type it can read and with the shape
    `config` gives it, and no layer past the config's last. Found from the headers alone (the model built on the
    meta device: no memory, no data read), before anything is loaded, placed on a worker, or unloaded for it."""
    layers = {int(match.group(1)) for name in source.names() if (match := LAYER_PATTERN.match(name))}
    if beyond := sorted(layer for layer in layers if layer >= config.n_layers):
        # Loaded, those layers were never read: a model that answered garbage, its config from another checkpoint.
        raise WeightsError(
            f"{str(source.path)!r} holds weights for layer {beyond[-1]}, but {source.config_origin} says the model "
            f"has {config.n_layers} layers (0-{config.n_layers - 1}): the config does not belong to these weights"
        )
    names = stage_tensor_names(source, config, 0, config.n_layers, with_embedding=True, with_head=True)
    try:
        source.check_readable(names)  # read, an integer tensor failed the load after the served model was dropped
        shapes = {name: torch.empty(source.info(name).shape, device="meta") for name in names}
        build_transformer(
            config, shapes, 0, config.n_layers, with_embedding=True, with_head=True, dtype=torch.float32, device="meta"
        )
    except WeightsError as error:
        where = str(source.path)
        raise (error if where in str(error) else WeightsError(f"{where!r}: {error}")) from None
