"""How the new lower faces are made: the renderers, behind one interface (``base``), one
module each.

A renderer runs its own cached stages after ``complete`` and returns ``LowerFaces``: for each
output frame with a face, the new lower face in that frame's face box and the soft mask it is
pasted through (the blend stage does the pasting, whatever the renderer).

- ``native``: drawn from the video's own frames at the face's own size in the frame: per
  output frame the source frame whose mouth shape is nearest its target landmarks, the
  reference frame preferred (``pipeline.sources``; ``sources`` 1: the reference frame
  alone), bent onto the target landmarks by the thin-plate spline and resampled bicubically,
  colour-matched to the frame.
  Nothing is scaled up from a small image; a source softer than the video's typical frame
  (motion blur, focus) is sharpened to the typical detail (``match_detail``).
- ``diffusion``: the paper's model: one reference face at the model's crop size (128 px for
  ``cpu-128``), warped to the targets and refined by the TalkFormer denoiser in chunks, then
  scaled up into the frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dubtool.options import DEFAULT_SOURCES
from dubtool.pipeline.renderers.base import DiffusionSettings, LowerFaces, Renderer, RenderJob
from dubtool.pipeline.renderers.native import NativeRenderer

if TYPE_CHECKING:
    import torch

    from dubtool.nets.io import LoadedModel

__all__ = ["DiffusionSettings", "LowerFaces", "NativeRenderer", "RenderJob", "Renderer",
           "make_renderer"]


def make_renderer(name: str, model: LoadedModel, model_digest: str,
                  settings: DiffusionSettings, device: torch.device,
                  sources: int = DEFAULT_SOURCES) -> Renderer:
    """The renderer called ``name`` (one of ``options.RENDERERS``); ``sources``: the native
    renderer's, which takes its other settings from the model's config (``inference``). The
    diffusion renderer's module (torch, diffusers) is imported only for it."""
    if name == "native":
        inference = model.config.inference
        return NativeRenderer(sources, inference.sources, inference.native)
    if name == "diffusion":
        from dubtool.pipeline.renderers.diffusion import DiffusionRenderer

        return DiffusionRenderer(model, model_digest, settings, device)
    raise ValueError(f"unknown renderer {name!r}")
