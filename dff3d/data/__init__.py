"""Input pipeline: random-access sources, face crops with the paper's augmentations, batching."""

from dff3d.data.augment import NO_AUGMENT, AugmentConfig
from dff3d.data.pipeline import InputPipeline, PipelineConfig, eval_config
from dff3d.data.sources import ConcatSource, SyntheticSource, open_tfds

__all__ = ["AugmentConfig", "ConcatSource", "InputPipeline", "NO_AUGMENT", "PipelineConfig",
           "SyntheticSource", "eval_config", "open_tfds"]
