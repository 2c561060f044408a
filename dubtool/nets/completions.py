"""The landmark completions behind one interface: ``completion(pose, references, speech)``
-> lip/jaw points (``LandmarkCompletion.forward``), the kind named by
``CompletionConfig.kind``."""

from __future__ import annotations

from dubtool.nets.config import CompletionConfig
from dubtool.nets.landmark_completion import LandmarkCompletion
from dubtool.nets.linear_completion import LinearCompletion

CompletionNet = LandmarkCompletion | LinearCompletion

_KINDS: dict[str, type[CompletionNet]] = {"transformer": LandmarkCompletion,
                                          "linear": LinearCompletion}


def build_completion(config: CompletionConfig) -> CompletionNet:
    """An untrained completion of the kind and size ``config`` says."""
    return _KINDS[config.kind](config)
