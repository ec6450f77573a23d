"""Resolve model references used by the CLI and configs into (module, example inputs).

References:

* ``torchvision:NAME`` -- ``torchvision.models.get_model(NAME, weights=None)``;
* ``timm:NAME`` -- ``timm.create_model(NAME, pretrained=False)``;
* ``hf:PATH`` -- a Hugging Face config (directory with ``config.json``, or the JSON file), random init;
* ``package.module:callable`` -- a callable returning a module or ``(module, example_inputs)``.

Nothing is downloaded: weights are random unless the caller loads a checkpoint.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
from torch import nn

from fxmerge.errors import ConfigError


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError as e:
        raise ConfigError(f"input shape {text!r} is not a comma-separated list of integers (e.g. 1,3,64,64)") from e


def load_model_spec(ref: str, input_shape: str | tuple[int, ...] | None = None) -> tuple[nn.Module, Any]:
    """Build the referenced model (eval mode) and example inputs."""
    shape = parse_shape(input_shape) if isinstance(input_shape, str) or input_shape is None else tuple(input_shape)
    kind, sep, name = ref.partition(":")
    if not sep or not name:
        raise ConfigError(
            f"model reference {ref!r} must look like torchvision:NAME, timm:NAME, hf:PATH or package.module:callable"
        )
    if kind == "torchvision":
        return _torchvision(name, shape)
    if kind == "timm":
        return _timm(name, shape)
    if kind == "hf":
        return _hf(name, shape)
    return _callable(kind, name, shape)


def _image_input(shape: tuple[int, ...] | None, default: tuple[int, ...]) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(shape or default, generator=g),)


def _torchvision(name: str, shape) -> tuple[nn.Module, Any]:
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"torchvision has no model {name!r}: {e}") from e
    return model.eval(), _image_input(shape, (1, 3, 224, 224))


def _timm(name: str, shape) -> tuple[nn.Module, Any]:
    import timm

    try:
        model = timm.create_model(name, pretrained=False)
    except RuntimeError as e:
        raise ConfigError(f"timm has no model {name!r}: {e}") from e
    default = (1, *model.pretrained_cfg.get("input_size", (3, 224, 224)))
    return model.eval(), _image_input(shape, default)


def _hf(path: str, shape) -> tuple[nn.Module, Any]:
    try:
        import transformers
    except ImportError as e:
        raise ConfigError("hf: models need the 'transformers' package (pip install 'fxmerge[hf]')") from e
    if not os.path.exists(path):
        raise ConfigError(f"hf: {path!r} does not exist (give a directory with config.json or a config JSON file)")
    config = transformers.AutoConfig.from_pretrained(path)
    model = transformers.AutoModel.from_config(config).eval()
    if hasattr(config, "use_cache"):
        config.use_cache = False
    if getattr(config, "num_channels", None) and getattr(config, "image_size", None):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        return model, _image_input(shape, (1, config.num_channels, size, size))
    seq = shape or (1, 16)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(int(getattr(config, "vocab_size", 100)), 1000), seq, generator=g)
    kwargs: dict[str, Any] = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = ids
    return model, ({**kwargs},)


def _callable(module: str, attr: str, shape) -> tuple[nn.Module, Any]:
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import {module}:{attr}: {e}") from e
    obj = fn()
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], nn.Module):
        model, inputs = obj
        if shape is not None:
            inputs = _image_input(shape, shape)
        return model.eval(), inputs
    if not isinstance(obj, nn.Module):
        raise ConfigError(f"{module}:{attr}() returned {type(obj).__name__}, expected an nn.Module or (module, inputs)")
    if shape is None:
        raise ConfigError(f"{module}:{attr}() returned only a module: pass --input-shape for its example input")
    return obj.eval(), _image_input(shape, shape)
