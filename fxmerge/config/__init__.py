"""YAML-driven merges: ``fxmerge merge CONFIG.yaml --out DIR`` and its Python twin :func:`run_merge_config`.

Schema (paths relative to the YAML file)::

    models:                              # two or more, same architecture
      - model: torchvision:resnet18      # or timm:NAME, hf:CONFIG_DIR, package.module:callable
        checkpoint: a.pt                 # optional: .pt/.pth/.bin state dict or .safetensors
        input_shape: [1, 3, 224, 224]    # optional example-input shape
      - {model: torchvision:resnet18, checkpoint: b.safetensors}
    method: mudsc                        # average, rebasin, act_align, zipit, wzip, mudsc
    options: {alpha: 0.5, matcher: align, seed: 0, reset_bn: true, repair: false, stop_at: null,
              zip_alpha: 0.5, zip_beta: 1.0, max_batches: 8, max_sweeps: 30, patience: 5, frontend: auto,
              depth: null, width: null, where: start, blocks: null, cka_batches: null}   # depth: lma|sma|uniform
    data:                                # exactly one of:
      digits: {classes: [0, 1, 2], split: train, batch_size: 64, limit: null, seed: 0}
      # image_folder: {path: imgs/, size: 224, batch_size: 32, limit: 256, mean: [...], std: [...]}
      # callable: mypkg.data:batches     # returns an iterable of batches
    evaluate: mypkg.eval:accuracy        # optional: fn(model) -> {metric: float}
    input_shape: [1, 3, 224, 224]        # optional default for every model
    outputs: {checkpoint: true, onnx: false, onnx_dynamic_batch: true, onnx_exporter: dynamo, report: true,
              plots: true, max_heatmaps: 24}

See docs/cli.md and docs/getting_started.md.
"""

from fxmerge.config.refs import build_model, is_merged_dir, load_merged, load_source
from fxmerge.config.run import as_config, run_merge_config
from fxmerge.config.schema import MergeConfig, load_merge_config, parse_merge_config

__all__ = [
    "MergeConfig",
    "as_config",
    "build_model",
    "is_merged_dir",
    "load_merge_config",
    "load_merged",
    "load_source",
    "parse_merge_config",
    "run_merge_config",
]
