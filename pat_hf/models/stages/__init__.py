"""The stage layer: four stage features, pooled pre-logits and logits of any timm model from one forward.

This is the only module that knows about architecture families. Everything else sees a model through
`StageLayer`: a list of four stage features in one of two canonical layouts, the pooled pre-logit vector and
the logits, plus the option to rewrite the input of each stage (PAT's prompts) during that same forward.

Canonical layouts (what distillers see):
  * feature maps: (B, C, H, W) for convolutional stages;
  * token sequences: (B, L, C) for transformer / MLP stages, prefix (class, register) tokens first, the same
    number of them in every stage. NHWC stage outputs (Swin, MambaOut, ...) are flattened row-major to tokens,
    as the reference did; tokens kept in another order (Hiera's unrolled units) are put back in row-major order.
  A model whose stages mix both (a CNN with a token last stage) is seen as maps: its token stages are laid out
  on their grid, prefix tokens dropped.

How the four stages are chosen, from `feature_info` (the reference's choices where it has them, docs/REFERENCE.md,
Stages, then generalised). Its entries are taken in execution order and grouped by reduction (one group per
resolution); entries a forward never reaches, or whose output has no tensor of the announced width, are left
out. A module name is also found as the one module it ends (a wrapped `encoder.blocks.k`), a ModuleList stands
for its blocks, and a tuple output or argument gives its tensor of the announced width with the most positions
(PiT's map, not its class token). A 4-D tensor is NCHW or NHWC as its width and image-shaped grid say. Then:
  * four resolutions or more: the last entry of each of the last four (ResNet layer1-4, ConvNeXt stages, Swin
    layers, RegNet s1-s4, ...);
  * one resolution (ViT/DeiT, BEiT, EVA, Mixer, ResMLP, ConvMixer): its blocks split 2:2:6:2, i.e. blocks 1,
    3, 9, 11 of 12, in general the block ending at the 2/12, 4/12, 10/12 and 12/12 point of the depth;
  * two or three resolutions (LeViT, EfficientViT-MSRA, VOLO, Sequencer, ...): the resolution with the most
    blocks per stage gets one more stage until there are four, and a resolution with several stages has its
    blocks split evenly. The blocks of a resolution are its `feature_info` entries when it has several,
    otherwise the blocks of the (largest) block list inside its module;
  * family rules fix what `feature_info` gets wrong or what the reference chose otherwise: EfficientNet's
    stage 4 is the head conv (`conv_head` + `bn2`), as the reference took for MobileNetV2; Swin's prompts go
    after the patch merging; Twins, MViTv2, CoaT, CrossViT and HRNet get other feature modules; Hiera's and
    NesT's tokens a row-major order (the `FEATURE_RULES`, `STAGE_RULES` and `TOKEN_ORDER_RULES` below).
Stage k's input (where PAT inserts its prompt) is the input of the module that starts stage k: the stage
module itself for hierarchical models, the block after the previous stage's last block for block lists, and
for Swin the first block after the stage's patch merging.
"""

from pat_hf.models.stages.layer import StageLayer
from pat_hf.models.stages.plan import NUM_STAGES, StageOutput, StagePlan
from pat_hf.models.stages.selection import build_stage_plan

__all__ = ["NUM_STAGES", "StageLayer", "StageOutput", "StagePlan", "build_stage_plan"]
