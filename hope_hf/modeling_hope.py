"""HOPE as a Transformers 5 causal language model (paper arXiv 2512.24695 §8; docs/design.md §4).

`embed -> [HopeDecoderLayer] x N -> RMSNorm -> lm_head`; the decoder layer (a mixer residual, then the Continuum Memory
System) and its blocks are in `layers_hope.py`, the checks of the inputs and the handling of non-finite values in
`checks_hope.py`.

Module names follow Llama (`model.embed_tokens`, `model.layers.{i}`, `model.norm`, `lm_head`, see
docs/interfaces.md). This file is model code: it imports only torch, transformers and flat siblings, because
`save_pretrained` of a model registered for the Auto classes copies it next to the weights.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import can_return_tuple, logging

from .cache_hope import HopeCache
from .checks_hope import (
    NonFiniteWarning,
    _check_continued_cache,
    _check_ids,
    _check_logits_to_keep,
    _check_model_inputs,
    _contain_non_finite,
    _poison_outputs,
    _reads_values,
    _report_non_finite_state,
)
from .configuration_hope import HopeConfig
from .layers_hope import (
    HopeAttention,
    HopeCMS,
    HopeDecoderLayer,
    HopeMLP,
    HopeRMSNorm,
    HopeRotaryEmbedding,
)
from .memory_hope import CausalConv, HopeSelfModifyingTitans, _FastInit


logger = logging.get_logger(__name__)

__all__ = [
    "NonFiniteWarning",
    "HopeRMSNorm",
    "HopeRotaryEmbedding",
    "HopeAttention",
    "HopeMLP",
    "HopeCMS",
    "HopeDecoderLayer",
    "HopePreTrainedModel",
    "HopeModel",
    "HopeForCausalLM",
    "HOPE_AUTO_MAP",
]

# `config.json` `auto_map` of a saved HOPE folder: which class each Auto class loads with `trust_remote_code=True`.
HOPE_AUTO_MAP = {
    "AutoConfig": "configuration_hope.HopeConfig",
    "AutoModel": "modeling_hope.HopeModel",
    "AutoModelForCausalLM": "modeling_hope.HopeForCausalLM",
}


def _cache_field(output_cls) -> str:
    """Transformers renamed the cache field of model outputs from `past_key_values` (<= 5.2x) to `cache` (5.24)."""
    names = {f.name for f in fields(output_cls)}
    return "cache" if "cache" in names else "past_key_values"


_MODEL_CACHE_FIELD = _cache_field(BaseModelOutputWithPast)
_LM_CACHE_FIELD = _cache_field(CausalLMOutputWithPast)
# `generate` keeps the cache in its model kwargs under the same name as the output field
_GENERATE_CACHE_KWARG = _LM_CACHE_FIELD


def _pick_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    """`generate` passes the cache as `cache=` from Transformers 5.24 on and as `past_key_values=` before."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("Pass the cache once, as `past_key_values` or as `cache`, not both.")
    return past_key_values if past_key_values is not None else cache


# ---------------------------------------------------------------------------------------------------- models
class HopePreTrainedModel(PreTrainedModel):
    config_class = HopeConfig
    config: HopeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HopeDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    # a recurrent memory cannot be rolled back: no assisted / speculative decoding
    _is_stateful = True
    # the meta-learned initial states and gate readouts of the memories stay float32 under bf16/fp16 loading
    _keep_in_fp32_modules_strict = ["fast_init"]

    def __init__(self, config: HopeConfig, *inputs, **kwargs):
        # a config changed by assignment after it was built (`config.num_hidden_layers = 1`) is checked here, with
        # the same messages as at construction, rather than failing deep inside the model or at save time
        config.validate()
        super().__init__(config, *inputs, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        # each module initialises its own parameters: Transformers skips a module whose own parameters were all
        # loaded, so a Titans layer with a loaded `out_norm_weight` is not called for a fast_init or conv weight
        # that a checkpoint lacks (or that `ignore_mismatched_sizes` dropped)
        if isinstance(module, _FastInit):
            module.init_weights()
        elif isinstance(module, CausalConv):
            module.init_weights(self.config.initializer_range)
        elif isinstance(module, HopeSelfModifyingTitans):
            init.ones_(module.out_norm_weight)
        elif isinstance(module, HopeCMS) and hasattr(module, "level_weights"):
            init.ones_(module.level_weights)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # `save_pretrained` puts only the saved class in `auto_map`; with the code registered for the Auto classes
        # (`import hope_hf` does it, as does a `trust_remote_code` load) record all three, so that AutoConfig,
        # AutoModel and AutoModelForCausalLM each load the folder with `trust_remote_code=True`.
        if type(self)._auto_class is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **HOPE_AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)

    if not hasattr(PreTrainedModel, "activation_checkpointing_enable"):
        # Transformers < 5.2x only knows the (later deprecated) gradient_checkpointing_* names; give one API.
        def activation_checkpointing_enable(
            self, activation_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False
        ):
            """Checkpoint the activations of every decoder layer (alias of `gradient_checkpointing_enable`)."""
            if activation_checkpointing_kwargs is None:
                activation_checkpointing_kwargs = {"use_reentrant": False}
            return self.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=activation_checkpointing_kwargs,
                every_n_layers=every_n_layers,
                offload=offload,
            )

        def activation_checkpointing_disable(self):
            """Turn activation checkpointing off (alias of `gradient_checkpointing_disable`)."""
            return self.gradient_checkpointing_disable()


class HopeModel(HopePreTrainedModel):
    """The HOPE decoder stack without the LM head; returns the last hidden state (after the final RMSNorm)."""

    def __init__(self, config: HopeConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([HopeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = HopeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = HopeRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def _layer_masks(self, attention_mask, inputs_embeds, past_key_values, position_ids) -> dict:
        """One mask per layer type. A dict passed in (as `generate` does with compileable caches) is used as is."""
        if isinstance(attention_mask, dict):
            return attention_mask
        types = set(self.config.layer_types)
        masks = {}
        # Transformers finds the documents of a packed batch (position ids restarting at 0) only when there is no
        # mask and no cache. A cache that has seen nothing gives the mask sizes that no cache gives, so leave it
        # out then: an eval-mode forward (which builds a cache) separates packed documents as training does.
        mask_cache = past_key_values
        if attention_mask is None and past_key_values is not None and past_key_values.get_seq_length() == 0:
            mask_cache = None
        # positional 4th argument: named `past_key_values` up to Transformers 5.2x and `cache` in 5.24
        if "full_attention" in types:
            masks["full_attention"] = create_causal_mask(
                self.config, inputs_embeds, attention_mask, mask_cache, position_ids
            )
        if "sliding_attention" in types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(
                self.config, inputs_embeds, attention_mask, mask_cache, position_ids
            )
        if "linear_attention" in types:
            if attention_mask is not None and attention_mask.ndim != 2:
                raise ValueError(
                    "`attention_mask` must be the 2-D padding mask (batch, length), 1 = real token, 0 = padding, in a "
                    f"model with Titans layers (their memories must skip the padding); got a {attention_mask.ndim}-D "
                    "mask. Pass the 2-D mask: attention layers build their causal masks from it."
                )
            masks["linear_attention"] = attention_mask
        return masks

    def _check_arguments(self, input_ids, inputs_embeds, attention_mask, position_ids, past_key_values, cache,
                         kwargs: dict) -> Cache | None:
        """The checks of what `forward` is given, before any work; returns the cache (given as `past_key_values` or
        as `cache`) and takes `output_attentions` out of `kwargs`."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        past_key_values = _pick_cache(past_key_values, cache)
        if not (past_key_values is None or isinstance(past_key_values, HopeCache) or self.config.is_attention_only):
            raise ValueError(
                f"The cache of a model with Titans layers must be a `HopeCache` (the memories' fast weights live "
                f"there), got {type(past_key_values).__name__}. Leave it out (one is built) or pass "
                "`HopeCache(model.config)`."
            )
        _check_model_inputs(self.config, input_ids, inputs_embeds, attention_mask, position_ids,
                            past_key_values.get_seq_length() if past_key_values is not None else 0)
        output_attentions = kwargs.pop("output_attentions", None)
        if output_attentions if output_attentions is not None else getattr(self.config, "output_attentions", False):
            raise ValueError(
                "`output_attentions=True` is not supported by HOPE models: Titans layers have no attention weights, "
                "and attention layers do not return theirs. Leave it False."
            )
        return past_key_values

    def _cache_setting(self, use_cache: bool | None, past_key_values: Cache | None) -> tuple:
        """(Whether this forward fills a cache, the cache it continues)."""
        if use_cache is None:
            # in training a cache is only built when asked for: nobody decodes from it, and it would keep the final
            # fast-weight states (and their autograd graph) alive after the step
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # the checkpointed layers run twice (forward and backward recompute): a cache would be written twice
            if use_cache or past_key_values is not None:
                logger.warning_once("Activation checkpointing is on in training: running without a cache.")
            use_cache, past_key_values = False, None
        return use_cache, past_key_values

    def _run_layers(self, hidden_states, masks: dict, position_ids, past_key_values, output_hidden_states: bool,
                    **kwargs) -> tuple:
        """(The last decoder layer's output, before the final norm; the input of every layer, or None)."""
        position_embeddings = None
        if any(t != "linear_attention" for t in self.config.layer_types):
            position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden_states = () if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(
                hidden_states,
                attention_mask=masks.get(self.config.layer_types[i]),
                position_ids=position_ids,
                past_key_values=past_key_values,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        return hidden_states, all_hidden_states

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        cache: Cache | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        past_key_values = self._check_arguments(input_ids, inputs_embeds, attention_mask, position_ids,
                                                past_key_values, cache, kwargs)
        use_cache, past_key_values = self._cache_setting(use_cache, past_key_values)
        if output_hidden_states is None:
            output_hidden_states = bool(getattr(self.config, "output_hidden_states", False))

        embeds_given = inputs_embeds is not None
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        _check_continued_cache(past_key_values, inputs_embeds)
        if use_cache and past_key_values is None:
            past_key_values = HopeCache(self.config)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0).expand(inputs_embeds.shape[0], -1)

        masks = self._layer_masks(attention_mask, inputs_embeds, past_key_values, position_ids)
        poisoned = None
        if embeds_given and _reads_values(inputs_embeds, inputs_embeds.shape[1]):
            inputs_embeds, poisoned = _contain_non_finite(inputs_embeds, attention_mask, position_ids)
        hidden_states, all_hidden_states = self._run_layers(
            inputs_embeds, masks, position_ids, past_key_values, output_hidden_states, **kwargs
        )
        hidden_states = self.norm(hidden_states)
        if poisoned is not None:
            hidden_states = _poison_outputs(hidden_states, poisoned, past_key_values)
        elif past_key_values is not None and use_cache and not self.training:
            _report_non_finite_state(hidden_states, past_key_values)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            **{_MODEL_CACHE_FIELD: past_key_values},
        )


class HopeForCausalLM(HopePreTrainedModel, GenerationMixin):
    """HOPE with a language-modeling head (tied to the input embedding by default)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HopeConfig):
        super().__init__(config)
        self.model = HopeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def generate(self, inputs=None, *args, **kwargs):
        """`GenerationMixin.generate`, after one check of a cache passed in: the prompt (`inputs` / `input_ids`, or
        `inputs_embeds`) must go beyond what the cache has seen, since `generate` feeds the part it has not. A
        prompt no longer than the cache's tokens would otherwise be fed again in full."""
        cache = _pick_cache(kwargs.get("past_key_values"), kwargs.get("cache"))
        prompt = kwargs.get("inputs_embeds")
        if prompt is None:
            prompt = inputs if inputs is not None else kwargs.get("input_ids")
            if prompt is not None:  # the whole prompt, once per call (one host sync for its id range)
                _check_ids("input_ids", prompt, self.config.vocab_size)
        if cache is not None and isinstance(prompt, torch.Tensor) and prompt.dim() >= 2:
            seen = cache.get_seq_length()
            if 0 < seen and prompt.shape[1] <= seen:
                raise ValueError(
                    f"generate: the cache has seen {seen} tokens and the prompt holds {prompt.shape[1]}; pass the "
                    "whole sequence, with at least one token the cache has not seen (stream all but the prompt's "
                    "last token into the cache, then generate from the whole prompt)."
                )
        return super().generate(inputs, *args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """`generate` builds a `HopeCache` (the library's caches cannot hold fast-weight state)."""
        if any(model_kwargs.get(name) is not None for name in ("cache", "past_key_values")):
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.use_cache is False:
            return None
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported by HOPE models: "
                "they use their own recurrent HopeCache (leave cache_implementation unset)"
            )
        model_kwargs[_GENERATE_CACHE_KWARG] = HopeCache(self.config)
        return None

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets, not shifted (the loss shifts them); -100 marks positions without loss.
        logits_to_keep (`int` or `torch.Tensor`, defaults to 0):
            An int n keeps the logits of the last n positions (0 keeps all); a 1-D tensor keeps those positions.
        """
        _check_logits_to_keep(logits_to_keep)
        if labels is not None:
            inputs = input_ids if input_ids is not None else inputs_embeds
            if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 and isinstance(labels, torch.Tensor) and (
                labels.shape != inputs.shape[:2]
            ):
                raise ValueError(f"`labels` must have the shape of the input (batch, length) = "
                                 f"{tuple(inputs.shape[:2])} (not shifted: the loss shifts them); got "
                                 f"{tuple(labels.shape)}")
            _check_ids("labels", labels, self.config.vocab_size, ignore_index=-100)
            if isinstance(logits_to_keep, torch.Tensor) or logits_to_keep != 0:
                raise ValueError("`labels` needs the logits of every position: leave `logits_to_keep` at 0")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=_pick_cache(past_key_values, cache),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            if kwargs.get("num_items_in_batch") is None:
                # the mean over the labelled tokens, as a sum divided by their count, which is at least 1: a batch
                # without any (every label -100) has loss 0 and zero gradients, not NaN (0 / 0)
                kwargs["num_items_in_batch"] = (labels[:, 1:] != -100).sum().clamp(min=1)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{_LM_CACHE_FIELD: getattr(outputs, _MODEL_CACHE_FIELD)},
        )
