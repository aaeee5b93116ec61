"""Building a model's skeleton: the transformers class a config names, every parameter on `meta`.

Owns: `load_config` (a config.json dict read as `from_pretrained` reads it), `build_model` (the class from `architectures`, else the Auto classes), `parameters_on_meta`,
and NVILA's text component (`text_component`). Imports: errors only (and transformers).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from ..errors import DowserError

# hold a plain transformers CausalLM whose tensors are named `llm.<its own name>`.
LLM_PREFIX = "llm."


def text_component(config: dict) -> tuple[dict, str] | None:
    """(config of the transformers model to build, key prefix) for NVILA-style checkpoints, else None."""
    if isinstance(config.get("llm_cfg"), dict) and ("vision_tower_cfg" in config or "mm_projector_cfg" in config):
        return config["llm_cfg"], LLM_PREFIX
    if config.get("model_type") in ("nvila", "nvila_lite", "vila") and isinstance(config.get("text_config"), dict):
        return config["text_config"], LLM_PREFIX
    return None


@contextlib.contextmanager
def parameters_on_meta():
    """Create every nn.Parameter on `meta` (buffers stay real) and skip weight init."""
    from transformers.initialization import no_init_weights

    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        with no_init_weights():
            yield
    finally:
        nn.Module.register_parameter = original


def load_config(config: dict, where: str):
    """The transformers config object a config.json dict describes, read as `from_pretrained` reads it:
    transformers' JSON extensions decoded (`{"__float__": "Infinity"}`, written for `inf`/`nan` values
    such as Mamba hybrids' `time_step_limit`), then the model type's config class `from_dict`.
    DowserError when transformers does not know the model type."""
    import transformers
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    try:
        config_class = CONFIG_MAPPING[model_type]
    except KeyError:
        raise DowserError(
            f"{where}: no transformers class for model_type {model_type!r} (transformers {transformers.__version__}); "
            "dowser merge and protect still work when tensor names match"
        ) from None
    decoded = PretrainedConfig._decode_special_floats(copy.deepcopy(config))
    try:
        return config_class.from_dict(decoded)
    except Exception as e:  # transformers' own validation: one line, not a traceback
        raise DowserError(f"{where}: transformers cannot read this {model_type!r} config: "
                          f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None


def build_model(config: dict, dtype: torch.dtype, where: str) -> nn.Module:
    """The transformers model a config describes (its `architectures` class, else the causal-LM or
    image-text-to-text Auto class), parameters on meta, eval mode, no gradients."""
    import transformers

    model_type = config.get("model_type")
    cfg = load_config(config, where)
    classes = [getattr(transformers, a, None) for a in (config.get("architectures") or [])]
    classes = [c for c in classes if c is not None and hasattr(c, "_from_config")]
    classes += [transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText]
    errors = []
    model = None
    for cls in classes:
        # concrete classes build with _from_config, Auto classes with from_config
        make = cls.from_config if hasattr(cls, "_model_mapping") else cls._from_config
        for attn in ("sdpa", "eager"):  # sdpa where the family supports it
            try:
                with parameters_on_meta():
                    try:
                        model = make(cfg, dtype=dtype, attn_implementation=attn, experts_implementation="eager")
                    except TypeError:
                        model = make(cfg, dtype=dtype, attn_implementation=attn)
                break
            except Exception as e:  # a class or attention that does not take this config: try the next
                errors.append(f"{getattr(cls, '__name__', cls)}/{attn}: {(str(e).splitlines() or [type(e).__name__])[0]}")
        if model is not None:
            break
    if model is None:
        raise DowserError(f"{where}: cannot build a {model_type!r} model from its config ({'; '.join(errors)[:300]})")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model

