"""Configuration of HOPE (Nested Learning, Behrouz et al., NeurIPS 2025; arXiv 2512.24695).

A Transformers-5 dataclass config (`@strict`). Every invalid value raises a `ValueError` at construction that names
the field and the allowed values (see `HopeConfigError`). This file is model code: it is copied next to the weights by
`save_pretrained` and must import nothing but torch, transformers, huggingface_hub and flat siblings (`from .x`).
"""

# No `from __future__ import annotations` here: `@strict` type-checks fields from their annotations, and string
# annotations would switch those checks off.
import contextvars
import dataclasses
import difflib
import functools
import math
import warnings

from huggingface_hub.dataclasses import strict, validated_field
from huggingface_hub.errors import StrictDataclassError
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


__all__ = ["HopeConfig", "HopeConfigError", "HOPE_LAYER_TYPES", "CMS_VARIANTS", "default_cms_levels"]

# Mixer per layer. "linear_attention" is the self-modifying Titans memory (the name is one of the values that
# Transformers 5 accepts in `layer_types`; it also makes `DynamicCache(config=...)` treat the layer as recurrent).
HOPE_LAYER_TYPES = ("linear_attention", "full_attention", "sliding_attention")
CMS_VARIANTS = ("sequential", "independent")
CMS_LEVEL_KEYS = ("period", "intermediate_size")

# The inner learning rates' bound by memory depth: its default (measured on MQAR, docs/results.md) and its largest
# allowed value (MLP memories blow up above 2 on a constant token stream with saturated gates; docs/design.md).
DEFAULT_ETA_MAX = {1: 4.0, 2: 2.0}
MAX_ETA_MAX = {1: 16.0, 2: 2.0}

# Settings of how a model runs on this machine, not of the model: set at load time
# (`from_pretrained(path, memory_cuda_graphs=True)`) or on `model.config`, never written to `config.json` (a model
# trained with CUDA graphs must not ship with them on), and ignored where an older `config.json` holds them.
RUNTIME_SWITCHES = ("memory_cuda_graphs", "compile_chunk_step", "memory_kernels")
# Where the Titans memory's fused Triton kernels run (`memory_kernels`).
MEMORY_KERNELS = ("auto", "torch", "triton")

# Keys that a config accepts besides its fields: the ones `PreTrainedConfig` itself takes (and pops) and what a saved
# config.json or the Auto classes pass along. Any other key is a misspelling or a field of another model: an error in
# `HopeConfig(...)`, a warning naming it (and the closest field) when it comes from a saved config.json.
_GENERIC_KEYS = frozenset({
    "auto_map", "model_type", "name_or_path", "torch_dtype", "num_labels", "rope_scaling", "output_attentions",
    "attn_implementation", "experts_implementation", "per_layer_config", "use_return_dict",
})
_FROM_SAVED = contextvars.ContextVar("hope_config_from_saved", default=False)


def _generation_keys() -> frozenset:
    """Generation parameters that old configs carried (the base class pops them)."""
    try:
        from transformers import GenerationConfig

        return frozenset(GenerationConfig._get_default_generation_params())
    except Exception:  # a Transformers without that helper: nothing more is allowed
        return frozenset()


# Default CMS periods in tokens: paper Fig. 3 ("Hope in Nested Learning"): 16, 1M (2**20) and 16M (2**24).
DEFAULT_CMS_PERIODS = (16, 2**20, 2**24)


def default_cms_levels(hidden_size: int) -> list[dict]:
    """The chain used when `cms_levels` is not given: three levels at periods 16 / 2**20 / 2**24 tokens (paper
    Fig. 3), each of width 3/4 * hidden_size rounded up to a multiple of 64. With 64-wide heads at hidden size 1024
    a layer then holds about as many parameters as a Llama layer (12 * hidden_size**2), see docs/design.md."""
    width = 64 * max(1, -(-3 * hidden_size // 256))  # ceil(3/4 * hidden_size / 64) * 64
    return [{"period": p, "intermediate_size": width} for p in DEFAULT_CMS_PERIODS]


class HopeConfigError(StrictDataclassError, ValueError):
    """Raised for an invalid `HopeConfig`. A `ValueError` (what users catch) that is also the `StrictDataclassError`
    that `@strict` would have raised (what code written against huggingface_hub catches)."""


def _value_errors(cls):
    """Make construction, assignment and `validate()` raise `HopeConfigError` (a ValueError) where `@strict`
    raises its own errors, which are not ValueErrors (`StrictDataclassFieldValidationError` for a wrong type,
    `StrictDataclassClassValidationError` for a failed `validate_*`)."""

    def converting(inner):
        @functools.wraps(inner)
        def wrapper(self, *args, **kwargs):
            try:
                return inner(self, *args, **kwargs)
            except HopeConfigError:
                raise
            except StrictDataclassError as err:
                raise HopeConfigError(str(err)) from err

        return wrapper

    cls.__init__ = converting(cls.__init__)
    cls.__setattr__ = converting(cls.__setattr__)  # `config.chunk_size = 0` is refused as at construction
    validate = converting(cls.validate)
    validate.__is_defined_by_strict_decorator__ = True  # lets `@strict` subclasses replace it, as it allows
    cls.validate = validate
    return cls


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------ field checks
# Declared on the fields (`validated_field`): `@strict` runs them at construction and on every assignment, and its
# error names the field ("Validation error for field 'chunk_size': ValueError: must be ...").
def _int_field(default, minimum: int = 1, optional: bool = False):
    def check(value):
        if value is None and optional:
            return
        if not _is_int(value) or value < minimum:
            allowed = f"an integer >= {minimum}" + (" or None" if optional else "")
            raise ValueError(f"must be {allowed}, got {value!r}.")

    return validated_field(check, default=default)


def _bool_field(default: bool):
    def check(value):
        if not isinstance(value, bool):
            raise ValueError(f"must be True or False, got {value!r}.")

    return validated_field(check, default=default)


def _number_field(default, low: float, high: float = math.inf, low_open: bool = True, high_open: bool = True):
    def check(value):
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not _is_number(value) or not (above and below):
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise ValueError(f"must be a number in {interval}, got {value!r}.")

    return validated_field(check, default=default)


def _choice_field(default, choices: tuple):
    def check(value):
        if value not in choices:
            raise ValueError(f"must be one of {choices}, got {value!r}.")

    return validated_field(check, default=default)


def _layer_types_field():
    # checked on assignment, so also before the base class remaps legacy names ("mamba" -> "linear_attention",
    # "attention" -> "full_attention"): a HOPE layer is one of HOPE's three, whatever another model calls its layers
    def check(value):
        if value is None:
            return
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"`layer_types` must be a list with one entry per layer, each one of {HOPE_LAYER_TYPES}; "
                             f"got {value!r}.")
        unknown = [t for t in value if t not in HOPE_LAYER_TYPES]
        if unknown:
            raise ValueError(f"`layer_types` entries must be one of {HOPE_LAYER_TYPES}; got {unknown!r}.")

    return validated_field(check, default=None)


def _token_id_field(default, allow_list: bool = False):
    def check(value):
        if value is None or _is_int(value):
            return
        if allow_list and isinstance(value, list) and all(_is_int(v) for v in value):
            return
        raise ValueError(f"must be an integer{', a list of integers' if allow_list else ''} or None, got {value!r}.")

    return validated_field(check, default=default)


@_value_errors
@strict
class HopeConfig(PreTrainedConfig):
    r"""
    Configuration of a HOPE model ([`HopeModel`], [`HopeForCausalLM`]).

    Stack: `embed -> N x HopeDecoderLayer -> RMSNorm -> lm_head`. A decoder layer is
    `h = x + Mixer(RMSNorm(x))` followed by the Continuum Memory System (CMS), a chain of SwiGLU MLP levels.

    Args:
        vocab_size (`int`, defaults to 32000): vocabulary size.
        hidden_size (`int`, defaults to 1024): width D of the residual stream.
        num_hidden_layers (`int`, defaults to 24): number of decoder layers.
        num_attention_heads (`int`, defaults to 16): heads H of every mixer (Titans memories and attention).
        num_key_value_heads (`int`, *optional*): key/value heads of attention layers (grouped-query attention);
            defaults to `num_attention_heads`. Must divide it.
        head_dim (`int`, *optional*): head size d; defaults to `hidden_size // num_attention_heads`, in which case
            `hidden_size` must be divisible by `num_attention_heads`.
        layer_types (`list[str]`, *optional*): mixer of every layer, one of `"linear_attention"` (self-modifying
            Titans, the default for every layer), `"full_attention"`, `"sliding_attention"` (needs `sliding_window`).
        sliding_window (`int`, *optional*): window of `"sliding_attention"` layers, in tokens.
        max_position_embeddings (`int`, defaults to 4096): the context the rotary embedding of attention layers is
            built for (used by scaled RoPE types only; Titans layers have no position limit).
        chunk_size (`int`, defaults to 16): tokens per chunk of the Titans memory update (paper Fig. 3: 16).
        memory_depth (`int`, defaults to 1): layers of every memory. 1 = a linear memory M(z) = z W (the Titans
            paper's depth-1 memory; its rule is a gated delta rule), 2 = the paper's residual MLP
            M(z) = z + W1 sigma(W2 z) (Eq. 89) with sigma = l2norm(silu). Linear memories learn in-context recall
            far better in our measurements (docs/results.md), hence the default.
        memory_expansion (`int`, defaults to 2): hidden width m = memory_expansion * d of each MLP memory (depth 2).
        eta_max (`float`, *optional*): upper bound of the inner learning rates eta (one per memory). A write
            removes the fraction eta / (1 + eta |h|^2) of the memory's error on its key h (|h| = 1). Defaults to 4.0
            for linear memories (in (0, 16]) and 2.0 for MLP memories (in (0, 2]: above it a constant token stream
            with saturated gates blows them up).
        conv_kernel_size (`int`, defaults to 4): width of the causal depthwise convolutions on the q, k and v
            streams.
        self_modifying (`bool`, defaults to `True`): k, v, eta, alpha generated by their own adaptive memories,
            which learn in context toward self-generated targets (False: k, v are the l2-normalised key and value
            streams, eta and alpha static readouts of the key stream).
        adaptive_k (`bool`, defaults to `True`) / adaptive_v (`bool`, defaults to `True`): keys / values from
            adaptive memories (False: straight from their streams).
        dgd (`bool`, defaults to `True`): with MLP memories, delta gradient descent's erase on the first layer
            (False: plain curvature-normalised gradient steps there; the output layer keeps its delta rule).
            Linear memories have no first layer: `dgd=False` is refused for them.
        retention (`bool`, defaults to `True`): alpha gate (weight decay) on the memories.
        retain_toward_init (`bool`, defaults to `True`): retention pulls toward the meta-learned initial state.
        detach_self_targets (`bool`, defaults to `False`): stop the gradient through self-generated targets (an
            ablation: the values reach the loss only through the targets, so the value stream then learns nothing).
        recompute_memory_states (`bool`, defaults to `True`): when training, keep the fast weights of the Titans
            memories only every ~sqrt(#chunks) chunks and recompute the others in the backward pass (activation
            checkpointing inside the layer). Same numbers; much less memory for a little more compute.
        memory_cuda_graphs (`bool`, defaults to `False`): runtime switch (set at load time or on `model.config`,
            never saved in `config.json`). On a CUDA device, run each Titans layer's memory scan from CUDA graphs
            instead of launching its many small kernels one by one: in training (captured on the first step of each
            input shape, forward and backward), in passes without gradients such as evaluation (captured when an
            input shape comes the second time) and in decoding (from a batch shape's second token on). Same
            numbers; scans of batches with padding or document starts run eagerly; costs the graphs' memory, one
            set per input shape and layer (at most 4 shapes of each kind). Ignored elsewhere. Speed:
            docs/performance.md.
        compile_chunk_step (`bool`, defaults to `False`): runtime switch (not saved). In training mode, run the
            Titans memory's chunk step (forward, written-out backward, generation of keys, values and gates)
            compiled by `torch.compile` (Inductor). Compiles in the first step; numbers equal up to float32
            rounding. Needs what `torch.compile` needs (Triton on a GPU, a C++ compiler on a CPU). Eval mode stays
            eager. Speed: docs/performance.md.
        memory_kernels (`str`, defaults to `"torch"`): runtime switch (not saved). Where the Titans memory scan of
            linear memories (`memory_depth=1`) runs fused Triton kernels, one launch per chunk and layer forward and
            one backward (training, evaluation, decoding): `"torch"` never (the default until the kernels have been
            checked on a GPU), `"auto"` on CUDA tensors where the `triton` package is
            installed (`pip install 'hope-hf[gpu]'`) except in training with `compile_chunk_step` on, `"triton"`
            on any device (CPU tensors only under Triton's
            interpreter, `TRITON_INTERPRET=1`; an error without triton). Numbers and gradients equal
            the torch path up to float32 rounding (docs/performance.md).
        cms_levels (`list[dict]`, *optional*): CMS levels, lowest first, each `{"period": tokens,
            "intermediate_size": n}`; `period` 0 means frozen (a plain MLP). Defaults to
            [`default_cms_levels`]`(hidden_size)`.
        cms_variant (`str`, defaults to `"sequential"`): `"sequential"` (chained levels, paper Eq. 70/73) or
            `"independent"` (parallel levels, learned weighted sum, Eq. 74).
        rope_theta (`float`, defaults to 10000.0): RoPE base of attention layers. Kept equal to
            `rope_parameters["rope_theta"]`, which is what Transformers' rotary machinery reads.
        rope_parameters (`dict`, *optional*): Transformers RoPE parameters (`rope_type`, scaling, ...).
        attention_bias (`bool`, defaults to `False`): biases in the attention q/k/v/o projections.
        attention_dropout (`float`, defaults to 0.0): dropout on attention probabilities (training only).
        rms_norm_eps (`float`, defaults to 1e-6): epsilon of every RMSNorm.
        initializer_range (`float`, defaults to 0.02): std of the normal init of linear and embedding weights.
        tie_word_embeddings (`bool`, defaults to `True`): share `lm_head.weight` with the input embedding.
        use_cache (`bool`, defaults to `True`): return a cache from the forward pass.
        pad_token_id / bos_token_id / eos_token_id: special token ids.
    """

    model_type = "nested_hope"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = _int_field(32000)
    hidden_size: int = _int_field(1024)
    num_hidden_layers: int = _int_field(24)
    num_attention_heads: int = _int_field(16)
    num_key_value_heads: int | None = _int_field(None, optional=True)
    head_dim: int | None = _int_field(None, optional=True)
    layer_types: list[str] | None = _layer_types_field()
    sliding_window: int | None = _int_field(None, optional=True)
    max_position_embeddings: int = _int_field(4096)
    # self-modifying Titans
    chunk_size: int = _int_field(16)
    memory_depth: int = _choice_field(1, (1, 2))
    memory_expansion: int = _int_field(2)
    eta_max: float | int | None = None  # its range depends on memory_depth: checked in validate_architecture
    conv_kernel_size: int = _int_field(4)
    self_modifying: bool = _bool_field(True)
    adaptive_k: bool = _bool_field(True)
    adaptive_v: bool = _bool_field(True)
    dgd: bool = _bool_field(True)
    retention: bool = _bool_field(True)
    retain_toward_init: bool = _bool_field(True)
    detach_self_targets: bool = _bool_field(False)
    recompute_memory_states: bool = _bool_field(True)
    memory_cuda_graphs: bool = _bool_field(False)  # runtime switches: never saved (RUNTIME_SWITCHES)
    compile_chunk_step: bool = _bool_field(False)
    memory_kernels: str = _choice_field("torch", MEMORY_KERNELS)
    # continuum memory system
    cms_levels: list[dict] | None = None
    cms_variant: str = _choice_field("sequential", CMS_VARIANTS)
    # attention
    rope_theta: float | int = _number_field(10000.0, 0.0)
    rope_parameters: dict | None = None
    attention_bias: bool = _bool_field(False)
    attention_dropout: float | int = _number_field(0.0, 0.0, 1.0, low_open=False)
    # common
    rms_norm_eps: float | int = _number_field(1e-6, 0.0)
    initializer_range: float | int = _number_field(0.02, 0.0, low_open=False)
    tie_word_embeddings: bool = _bool_field(True)
    use_cache: bool = _bool_field(True)
    pad_token_id: int | None = _token_id_field(None)
    bos_token_id: int | None = _token_id_field(None)
    eos_token_id: int | list[int] | None = _token_id_field(None, allow_list=True)

    def __post_init__(self, **kwargs):
        self._check_unknown_keys(kwargs)
        if self.rope_parameters is not None and not isinstance(self.rope_parameters, dict):
            raise HopeConfigError(f"`rope_parameters` must be a dict or None, got {self.rope_parameters!r}.")
        heads = self.num_attention_heads
        if self.head_dim is None and _is_int(self.hidden_size) and _is_int(heads) and heads > 0:
            if self.hidden_size % heads != 0:
                raise HopeConfigError(
                    f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` ({heads}) when "
                    "`head_dim` is not given; set `head_dim` explicitly or choose a divisible `hidden_size`."
                )
            self.head_dim = self.hidden_size // heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = heads
        if self.layer_types is None and _is_int(self.num_hidden_layers) and self.num_hidden_layers > 0:
            self.layer_types = ["linear_attention"] * self.num_hidden_layers
        elif self.layer_types is not None:
            self.layer_types = list(self.layer_types)
        if self.cms_levels is None and _is_int(self.hidden_size) and self.hidden_size > 0:
            self.cms_levels = default_cms_levels(self.hidden_size)
        elif isinstance(self.cms_levels, (list, tuple)):
            # copy, so that the caller's list is never aliased (and a tuple becomes the list JSON gives back)
            self.cms_levels = [dict(level) if isinstance(level, dict) else level for level in self.cms_levels]
        if self.eta_max is None:
            self.eta_max = DEFAULT_ETA_MAX.get(self.memory_depth, 4.0)
        for name in ("eta_max", "rope_theta", "attention_dropout", "rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if _is_int(value):
                setattr(self, name, float(value))
        self._sync_rope_theta()
        super().__post_init__(**kwargs)

    @classmethod
    def _unknown_key_message(cls, key: str) -> str:
        fields = sorted(f.name for f in dataclasses.fields(cls))
        close = difflib.get_close_matches(key, fields, n=1)
        return f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")

    def _check_unknown_keys(self, kwargs: dict) -> None:
        """A key that is neither a field nor one the base class takes: an error naming it and the closest field;
        a warning (the key kept as an attribute, as Transformers does) when it comes from a saved config.json."""
        unknown = [k for k in kwargs if k not in _GENERIC_KEYS and not k.startswith("_") and k not in
                   _generation_keys()]
        if not unknown:
            return
        names = ", ".join(self._unknown_key_message(k) for k in unknown)
        if _FROM_SAVED.get():
            warnings.warn(f"HopeConfig: the saved config holds unknown field(s) {names}; not used by HOPE",
                          UserWarning, stacklevel=2)
            return
        raise HopeConfigError(f"unknown config field(s) {names}; the fields are those of HopeConfig (see its "
                              "docstring)")

    def _sync_rope_theta(self):
        """`rope_theta` is the public name; Transformers' rotary code reads `rope_parameters["rope_theta"]`.
        A given `rope_parameters` dict wins; a non-default `rope_theta` that contradicts it is an error."""
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
            return
        self.rope_parameters = dict(self.rope_parameters)
        given = self.rope_parameters.get("rope_theta")
        if given is None:
            self.rope_parameters["rope_theta"] = self.rope_theta
        elif _is_number(given):
            if self.rope_theta != 10000.0 and float(given) != self.rope_theta:
                raise HopeConfigError(
                    f"`rope_theta` ({self.rope_theta}) contradicts `rope_parameters['rope_theta']` ({given}); "
                    "give one of them, or the same value in both."
                )
            self.rope_theta = float(given)

    # ---------------------------------------------------------------------------------------------- validation
    # `@strict` runs every `validate_*` method after `__init__` (and again in `save_pretrained`), in alphabetical
    # order; `validate_architecture` therefore runs before the library's generic `validate_layer_type`, so users see
    # HOPE's own messages (with HOPE's allowed values).
    def validate_architecture(self):
        """HOPE's checks across fields (single fields are checked where they are declared). Each error names the
        field and what it allows."""
        self._check_tokens_and_heads()
        self._check_memory()
        self._check_layer_types()
        self._check_cms_levels()
        self._check_rope()

    # the parts of `validate_architecture`; not named validate_*, which `@strict` would run as validators of their own
    def _check_tokens_and_heads(self):
        """`pad_token_id` inside the vocabulary; key-value heads that divide the attention heads."""
        pad = self.pad_token_id
        if pad is not None and not -self.vocab_size <= pad < self.vocab_size:
            raise ValueError(
                f"`pad_token_id` must be None or a token id below `vocab_size` ({self.vocab_size}), got {pad!r}."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_key_value_heads` ({self.num_key_value_heads}) must divide `num_attention_heads` "
                f"({self.num_attention_heads})."
            )

    def _check_memory(self):
        """`eta_max` within the range of the memory depth; `dgd` only where a first memory layer exists."""
        limit = MAX_ETA_MAX[self.memory_depth]
        if not _is_number(self.eta_max) or not (0.0 < self.eta_max <= limit):
            kind = "linear memories" if self.memory_depth == 1 else "MLP memories (memory_depth=2)"
            raise ValueError(f"`eta_max` must be a number in (0, {limit:g}] for {kind}, got {self.eta_max!r}.")
        if self.memory_depth == 1 and not self.dgd:
            raise ValueError(
                "`dgd`=False removes the erase on the first layer of residual MLP memories; linear memories "
                "(`memory_depth`=1) have no first layer (their rule is the delta rule itself): set `dgd`=True."
            )

    def _check_layer_types(self):
        """One known type per layer; what attention layers need (even `head_dim`, a `sliding_window`)."""
        layer_types = self.layer_types
        if not isinstance(layer_types, list) or len(layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"`layer_types` must be a list with one entry per layer (`num_hidden_layers`={self.num_hidden_layers})"
                f", each one of {HOPE_LAYER_TYPES}; got {layer_types!r}."
            )
        if set(layer_types) != {"linear_attention"} and self.head_dim % 2:
            raise ValueError(
                f"`head_dim` must be even when `layer_types` has attention layers (RoPE rotates pairs of "
                f"dimensions), got {self.head_dim}; Titans layers alone take any head size."
            )
        if "sliding_attention" in layer_types:
            if not _is_int(self.sliding_window) or self.sliding_window < 1:
                raise ValueError(
                    "`sliding_window` must be an integer >= 1 when `layer_types` contains 'sliding_attention', "
                    f"got {self.sliding_window!r}."
                )

    def _check_cms_levels(self):
        """`cms_levels`: a non-empty list of `{'period', 'intermediate_size'}` dicts of integers."""
        levels = self.cms_levels
        if not isinstance(levels, list) or len(levels) == 0:
            raise ValueError(
                "`cms_levels` must be a non-empty list of {'period': tokens, 'intermediate_size': n} dicts, "
                f"got {levels!r}."
            )
        for i, level in enumerate(levels):
            if not isinstance(level, dict) or set(level) != set(CMS_LEVEL_KEYS):
                raise ValueError(
                    f"`cms_levels[{i}]` must be a dict with exactly the keys {CMS_LEVEL_KEYS}, got {level!r}."
                )
            period, width = level["period"], level["intermediate_size"]
            if not _is_int(period) or period < 0:
                raise ValueError(
                    f"`cms_levels[{i}]['period']` must be an integer >= 0 (tokens between updates; 0 = frozen), "
                    f"got {period!r}."
                )
            if not _is_int(width) or width < 1:
                raise ValueError(f"`cms_levels[{i}]['intermediate_size']` must be an integer >= 1, got {width!r}.")

    def _check_rope(self):
        """One `rope_theta`, a known `rope_type`."""
        rope = self.rope_parameters
        if isinstance(rope, dict) and _is_number(rope.get("rope_theta")) and float(rope["rope_theta"]) != float(
            self.rope_theta
        ):
            raise ValueError(
                f"`rope_theta` ({self.rope_theta}) differs from `rope_parameters['rope_theta']` "
                f"({rope['rope_theta']}); set both to the same value."
            )
        rope_types = ("default", *sorted(ROPE_INIT_FUNCTIONS))
        if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) not in rope_types:
            raise ValueError(
                f"`rope_parameters['rope_type']` must be one of {rope_types}, got "
                f"{rope.get('rope_type', rope.get('type'))!r}."
            )

    def validate_rope(self):
        """Transformers' RoPE checks (after `validate_architecture`), a missing key reported as the ValueError that
        every other invalid value raises rather than as a KeyError. Where no layer is an attention layer nothing
        uses RoPE, and its rule that `head_dim` be even (which would refuse an odd head size that Titans layers take)
        does not apply."""
        library_check = getattr(super(), "validate_rope", None)
        if library_check is None:
            return
        try:
            library_check()
        except KeyError as err:
            raise ValueError(f"`rope_parameters`: {err.args[0]}") from err
        except ValueError as err:
            titans_only = isinstance(self.layer_types, list) and set(self.layer_types) == {"linear_attention"}
            if not (titans_only and "even rotary dimension" in str(err)):
                raise

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """Like `PreTrainedConfig.from_dict`, but keyword overrides of HOPE's fields (`from_pretrained(path,
        num_hidden_layers=2)`) go into the config before it is built, so that they are checked like any other value
        instead of being set unchecked afterwards. A smaller `num_hidden_layers` without `layer_types` keeps the
        first layers' types, as loading the first layers' weights does."""
        saved_type = config_dict.get("model_type")
        if saved_type is not None and saved_type != cls.model_type:
            raise HopeConfigError(
                f"this is the config of a {saved_type!r} model, not of a HOPE model ({cls.model_type!r}): its weights "
                "would not fit. Convert a Llama-family model with `hope-hf convert` (hope_hf.convert)."
            )
        own = {f.name for f in dataclasses.fields(cls)} & set(HopeConfig.__annotations__)
        overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in own}
        saved = {key: value for key, value in config_dict.items() if key not in RUNTIME_SWITCHES}
        config_dict = {**saved, **overrides}
        saved_types = config_dict.get("layer_types")
        layers = overrides.get("num_hidden_layers")
        if "layer_types" not in overrides and _is_int(layers) and isinstance(saved_types, list):
            if 1 <= layers <= len(saved_types):
                config_dict["layer_types"] = saved_types[:layers]
            else:
                raise HopeConfigError(
                    f"`num_hidden_layers`={layers} was given for a config of {len(saved_types)} layers: pass "
                    f"`layer_types` too (one entry per layer, each one of {HOPE_LAYER_TYPES}), or at most "
                    f"{len(saved_types)} layers (the first ones are kept)."
                )
        token = _FROM_SAVED.set(True)  # unknown keys of a saved config warn instead of failing
        try:
            return super().from_dict(config_dict, **kwargs)
        finally:
            _FROM_SAVED.reset(token)

    def to_dict(self) -> dict:
        """The config as saved: every field but the runtime switches (`RUNTIME_SWITCHES`)."""
        output = super().to_dict()
        for key in RUNTIME_SWITCHES:
            output.pop(key, None)
        return output

    # ---------------------------------------------------------------------------------------------- helpers
    @property
    def cms_periods(self) -> list[int]:
        """Period (tokens between updates; 0 = frozen) of every CMS level, lowest level first."""
        return [int(level["period"]) for level in self.cms_levels]

    @property
    def is_attention_only(self) -> bool:
        """True when no layer holds a self-modifying Titans memory."""
        return all(t != "linear_attention" for t in self.layer_types)

