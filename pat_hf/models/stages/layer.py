"""`StageLayer`: the four stage features, pooled pre-logits and logits of a model from one forward, with the
option to rewrite each stage's input (PAT's prompts) during it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from pat_hf.models.dry_run import dry_run
from pat_hf.models.stages.plan import NUM_STAGES, PROBE_BATCH, PromptFn, StageOutput, TensorView
from pat_hf.models.stages.selection import build_stage_plan


def _classifiers(model: nn.Module) -> list[nn.Module]:
    """The module(s) whose input is the pooled feature: one head, or one per branch (CrossViT)."""
    classifier = model.get_classifier()
    if isinstance(classifier, tuple):  # (head, distillation head) of DeiT/LeViT-distilled: the same input
        classifier = classifier[0]
    heads = list(classifier) if isinstance(classifier, nn.ModuleList) else [classifier]
    # A whole classifier head (Sequencer's) pools inside: its final layer sees the pooled feature.
    return [head.fc if isinstance(getattr(head, "fc", None), nn.Module) else head for head in heads]


def _pooled(inputs: list[torch.Tensor]) -> torch.Tensor:
    """The classifier input(s) as (B, C): a head that pools on its own gets the pooled (B, C, 1, 1) or tokens."""
    flat = [x.flatten(1) if x.ndim == 4 and x.shape[2:] == (1, 1) else x.mean(dim=(2, 3)) if x.ndim == 4
            else x.mean(dim=1) if x.ndim == 3 else x for x in inputs]
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=-1)


class StageLayer:
    """A timm model seen as four stages. Holds a reference to the model (not a submodule of it)."""

    def __init__(self, model: nn.Module, input_size: tuple[int, int, int]):
        self.model = model
        self.input_size = tuple(input_size)
        self.plan = build_stage_plan(model, self.input_size)
        self.stage_shapes, self.stage_input_shapes, self.pooled_dim = self._discover_shapes()

    @property
    def is_sequence(self) -> bool:
        return self.plan.is_sequence

    @property
    def num_prefix_tokens(self) -> int:
        return self.plan.num_prefix_tokens

    def _discover_shapes(self):
        with self._capture() as captured:
            dry_run(self.model, self.input_size, PROBE_BATCH)
        if any(t is None for t in captured["stages"] + captured["inputs"]) or not captured["pooled"]:
            raise ValueError(f"{type(self.model).__name__}: a stage or the classifier is not reached by a forward")
        stage_shapes = [tuple(t.shape[1:]) for t in captured["stages"]]
        input_shapes = [tuple(t.shape[1:]) for t in captured["inputs"]]
        return stage_shapes, input_shapes, _pooled(captured["pooled"]).shape[-1]

    def __call__(self, x: torch.Tensor, prompts: Mapping[int, PromptFn] | None = None) -> StageOutput:
        captured, handles = self._add_hooks(prompts)
        try:
            logits = self.model(x)
        finally:
            _remove_hooks(handles)
        return StageOutput(captured["stages"], _pooled(captured["pooled"]), logits)

    @contextlib.contextmanager
    def _capture(self, prompts: Mapping[int, PromptFn] | None = None) -> Iterator[dict]:
        captured, handles = self._add_hooks(prompts)
        try:
            yield captured
        finally:
            _remove_hooks(handles)

    # Registering a hook creates a RemovableHandle, which torch.compile cannot trace: both ends run outside the
    # graph (two graph breaks per call), and the forward between them is traced with the hooks in place.
    @torch.compiler.disable
    def _add_hooks(self, prompts: Mapping[int, PromptFn] | None) -> tuple[dict, list[RemovableHandle]]:
        """Hooks that fill `captured` (and apply `prompts`) during one forward; they live only until
        `_remove_hooks`, so copies of the model (EMA, DDP) never inherit them."""
        stages: list[torch.Tensor | None] = [None] * NUM_STAGES
        inputs: list[torch.Tensor | None] = [None] * NUM_STAGES
        captured: dict = {"stages": stages, "inputs": inputs, "pooled": []}
        prompts = prompts or {}

        def on_stage_input(k: int, view: TensorView):
            def hook(_module, args):
                x = view.to_canonical(args)
                inputs[k] = x
                if k in prompts:
                    return view.from_canonical(prompts[k](x), args)
                return None
            return hook

        def on_stage_output(k: int, view: TensorView):
            def hook(_module, _args, output):
                stages[k] = view.to_canonical(output)
            return hook

        def on_classifier_input(_module, args):
            captured["pooled"].append(args[0])

        plan = self.plan
        handles = []
        try:
            for k in range(NUM_STAGES):
                handles.append(self.model.get_submodule(plan.starts[k]).register_forward_pre_hook(
                    on_stage_input(k, plan.inputs[k])))
                handles.append(self.model.get_submodule(plan.ends[k]).register_forward_hook(
                    on_stage_output(k, plan.outputs[k])))
            for classifier in _classifiers(self.model):
                handles.append(classifier.register_forward_pre_hook(on_classifier_input))
        except BaseException:
            _remove_hooks(handles)
            raise
        return captured, handles


@torch.compiler.disable
def _remove_hooks(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
