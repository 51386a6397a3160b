"""neurosteer: find and steer the features that carry a language model's reasoning.

The Rust core of the ``neurosteer`` command line, callable from Python: load a model and run it
with TransformerLens-named hooks (``Model.run_with_cache``), load transcoders (``Transcoder``),
generate with steering (``Model.generate`` with ``Steering``), and run the pipeline's stages
(``trace``, ``classify``, ``steer``, ``evaluate``) with the command line's options as keyword
arguments. Arrays are numpy arrays; errors raise ``NeurosteerError`` with the one-line message
the command line prints. Long computations release the GIL.
"""

from ._native import (
    Model,
    ModelConfig,
    NeurosteerError,
    Steering,
    Transcoder,
    TranscoderConfig,
    classify,
    evaluate,
    steer,
    trace,
)

__all__ = [
    "Model",
    "ModelConfig",
    "NeurosteerError",
    "Steering",
    "Transcoder",
    "TranscoderConfig",
    "classify",
    "evaluate",
    "steer",
    "trace",
]
