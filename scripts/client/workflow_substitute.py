"""Options into an API-format workflow: nodes are found by class_type and links followed, never by id.

substitute() sets the video, prompts, checkpoint, seed, frames, steps, size and the one-shot tuning's
steps and precision; a prompt text shared by two inputs is cloned before one of them is changed.
"""
from __future__ import annotations

import copy

from comfy_client import WorkflowError

SAMPLER, INVERT, TUNE = "TuneAVideoSampler", "TuneAVideoInvert", "TuneAVideoTune"
LOAD_FRAMES, SAVE_VIDEO = "TuneAVideoLoadFrames", "TuneAVideoSaveVideo"
TEXT_ENCODE, CHECKPOINT, EMPTY_LATENT = "CLIPTextEncode", "CheckpointLoaderSimple", "EmptyLatentImage"


def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [nid for nid, node in prompt.items() if node.get("class_type") == class_type]


def _set_inputs(prompt, class_types, values: dict, option: str) -> None:
    ids = [nid for ct in class_types for nid in nodes_of(prompt, ct)]
    if not ids:
        raise WorkflowError(f"{option}: the workflow has no {' or '.join(class_types)} node to take it")
    for nid in ids:
        prompt[nid]["inputs"].update(values)


def _text_node(prompt: dict, consumer: str, input_name: str, option: str) -> str:
    """The CLIPTextEncode feeding consumer.input_name; cloned first if other inputs share it."""
    link = prompt[consumer]["inputs"].get(input_name)
    if not (isinstance(link, list) and prompt.get(str(link[0]), {}).get("class_type") == TEXT_ENCODE):
        raise WorkflowError(f"{option}: {prompt[consumer]['class_type']}.{input_name} is not fed by a "
                            f"{TEXT_ENCODE} node, so there is no text to replace")
    src = str(link[0])
    users = [(nid, name) for nid, node in prompt.items() for name, v in node["inputs"].items()
             if isinstance(v, list) and str(v[0]) == src]
    if len(users) > 1:  # the same encoder also feeds something else: give this input its own copy
        new_id = str(max((int(n) for n in prompt if n.isdigit()), default=0) + 1)
        prompt[new_id] = copy.deepcopy(prompt[src])
        prompt[consumer]["inputs"][input_name] = [new_id, link[1]]
        src = new_id
    return src


def _set_text(prompt, class_type, input_name, text, option) -> None:
    ids = nodes_of(prompt, class_type)
    if not ids:
        raise WorkflowError(f"{option}: the workflow has no {class_type} node")
    for nid in ids:
        prompt[_text_node(prompt, nid, input_name, option)]["inputs"]["text"] = text


def substitute(prompt: dict, *, video=None, positive=None, source_prompt=None, negative=None,
               checkpoint=None, seed=None, frames=None, steps=None, cfg=None, width=None, height=None,
               fps=None, filename_prefix=None, tune_steps=None, precision=None) -> dict:
    """A copy of the API-format prompt with the given options set (None = leave as is).

    source_prompt is the clip's prompt: the tuning's positive text (and its prompt_text) when the workflow
    tunes, else the inversion's conditioning. steps sets sampling and inversion, never the tuning's steps.
    Raises WorkflowError when an option has no node to go to (e.g. video in text-to-video).
    """
    p = copy.deepcopy(prompt)
    if video is not None:
        _set_inputs(p, [LOAD_FRAMES], {"video": video}, "--video")
    if checkpoint is not None:
        _set_inputs(p, [CHECKPOINT], {"ckpt_name": checkpoint}, "--checkpoint")
    if positive is not None:
        _set_text(p, SAMPLER, "positive", positive, "--prompt")
    if negative is not None:
        _set_text(p, SAMPLER, "negative", negative, "--negative")
    if source_prompt is not None:
        if nodes_of(p, TUNE):  # Tune-A-Video: tune on the clip's prompt, invert with the empty prompt
            _set_text(p, TUNE, "positive", source_prompt, "--source-prompt")
            _set_inputs(p, [TUNE], {"prompt_text": source_prompt}, "--source-prompt")
        else:
            _set_text(p, INVERT, "conditioning", source_prompt, "--source-prompt")
    if tune_steps is not None:
        _set_inputs(p, [TUNE], {"steps": tune_steps}, "--tune-steps")
    if precision is not None:
        _set_inputs(p, [TUNE], {"precision": precision}, "--precision")
    if seed is not None:
        _set_inputs(p, [SAMPLER], {"seed": seed}, "--seed")
    if cfg is not None:
        _set_inputs(p, [SAMPLER], {"cfg": cfg}, "--cfg")
    if steps is not None:  # inversion and sampling must walk the same schedule
        _set_inputs(p, [SAMPLER], {"steps": steps}, "--steps")
        for nid in nodes_of(p, INVERT):
            p[nid]["inputs"]["steps"] = steps
    if frames is not None:
        if nodes_of(p, LOAD_FRAMES):
            _set_inputs(p, [LOAD_FRAMES], {"frame_load_cap": frames}, "--frames")
        else:
            _set_inputs(p, [EMPTY_LATENT], {"batch_size": frames}, "--frames")
    for option, key, value in (("--width", "width", width), ("--height", "height", height)):
        if value is not None:
            _set_inputs(p, [LOAD_FRAMES, EMPTY_LATENT], {key: value}, option)
    if fps is not None:
        _set_inputs(p, [SAVE_VIDEO], {"fps": fps}, "--fps")
    if filename_prefix is not None:
        _set_inputs(p, [SAVE_VIDEO], {"filename_prefix": filename_prefix}, "--filename-prefix")
    return p
