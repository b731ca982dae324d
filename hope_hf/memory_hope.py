"""Self-modifying Titans: the fast-weight memory of HOPE (paper arXiv 2512.24695, Eq. 83-97; docs/design.md §6a).

Everything about the memory lives here: its parameters, the chunk-parallel update (the fast path used by the
model), the layout that keeps padding and packed documents from touching the memories, and the state that a
cache carries between calls. The token-by-token reference used by the tests is `tests/reference_memory.py`.

Notation (row vectors). Per head an MLP memory (`memory_depth=2`) is `M(z) = z + sigma(z A) B` with `A = W2^T`
(d x m), `B = W1^T` (m x d) and `sigma = l2norm o silu`; a linear memory (`memory_depth=1`, the default) is
`M(z) = z (I + B)` with `B` (d x d) and no `A` (an empty `(d, 0)` block keeps the state's layout). All memories of
a head keep `A` side by side, `(d, n*m)`, so every product with a shared left operand is one matmul, and `B` as
`(n, m, d)`. `n` is the number of memories (k, v, eta, alpha, o; fewer with ablations).
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from transformers.utils import logging


__all__ = ["HopeSelfModifyingTitans", "TitansState", "memory_boxes"]

logger = logging.get_logger(__name__)

# Initial gate biases: alpha = sigmoid(5) ~ 0.993 retains; the output memory's eta = eta_max * sigmoid(0) = eta_max / 2,
# the other memories' eta_max * sigmoid(-4) ~ 0.018 eta_max (docs/design.md, "Initialisation").
ALPHA_BIAS_INIT = 5.0
ETA_BIAS_INIT = 0.0
AUX_ETA_BIAS_INIT = -4.0
NORM_EPS = 1e-6


def memory_width(config) -> int:
    """Hidden width m of every memory: memory_expansion * head_dim for residual MLPs, head_dim for linear ones
    (their features are the inputs themselves)."""
    return config.memory_expansion * config.head_dim if config.memory_depth == 2 else config.head_dim


def memory_boxes(config) -> list[str]:
    """Names of the adaptive memories a layer holds, in storage order; the output memory "o" is always last."""
    boxes = []
    if config.self_modifying:
        if config.adaptive_k:
            boxes.append("k")
        if config.adaptive_v:
            boxes.append("v")
        boxes.append("eta")
        if config.retention:
            boxes.append("alpha")
    boxes.append("o")
    return boxes


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """z / sqrt(sum z^2 + eps) over the last dimension."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + NORM_EPS)


def fp32(x: torch.Tensor) -> torch.Tensor:
    """Fast-weight math runs in float32, or float64 when the model itself does."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@dataclass
class TitansState:
    """The fast state of one self-modifying Titans layer for a batch of sequences (all float32 except `chunk_pos`).

    Weights are absolute (not deviations): `snapshot_*` is the state at the end of the last completed chunk, the one
    that generates keys, values, gates, targets and gradients; `current_*` the state after the last token, the one
    that is read and written. `chunk_pos` counts the tokens already inside the current chunk (0 means a chunk just
    ended, and then snapshot == current). `conv_*` hold the last `conv_kernel_size - 1` pre-convolution inputs.
    """

    snapshot_in: torch.Tensor  # (B, H, d, n*m)
    snapshot_out: torch.Tensor  # (B, H, n, m, d)
    current_in: torch.Tensor  # (B, H, d, n*m)
    current_out: torch.Tensor  # (B, H, n, m, d)
    chunk_pos: torch.Tensor  # (B,) long
    conv_q: torch.Tensor  # (B, K-1, H*d)
    conv_k: torch.Tensor  # (B, K-1, H*d)
    conv_v: torch.Tensor  # (B, K-1, H*d)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def map(self, fn) -> "TitansState":
        """A new state with `fn` applied to every tensor (index_select for beams, repeat_interleave, detach, ...)."""
        return TitansState(**{name: fn(t) for name, t in self.tensors().items()})

    @property
    def batch_size(self) -> int:
        return self.chunk_pos.shape[0]


class _FastInit(nn.Module):
    """Meta-learned initial states and readouts of the memories; kept in float32 (`_keep_in_fp32_modules_strict`)."""

    def __init__(self, config, num_heads: int, head_dim: int, boxes: list[str]):
        super().__init__()
        d, m, n = head_dim, memory_width(config), len(boxes)
        # float32 also when the model is built in half precision (`from_config(config, dtype=torch.bfloat16)`), as
        # `from_pretrained` keeps them; a float64 build stays float64
        empty = functools.partial(torch.empty, dtype=torch.promote_types(torch.get_default_dtype(), torch.float32))
        if config.memory_depth == 2:
            self.init_in = nn.Parameter(empty(num_heads, d, n * m))  # initial A = W2^T of every memory
        self.init_out = nn.Parameter(empty(num_heads, n, m, d))  # initial B = W1^T of every memory
        # one learning rate per memory, each read from the learning-rate memory by its own readout
        self.eta_readout = nn.Parameter(empty(num_heads, n, d))
        self.eta_bias = nn.Parameter(empty(num_heads, n))
        if config.retention:
            self.alpha_readout = nn.Parameter(empty(num_heads, d))
            self.alpha_bias = nn.Parameter(empty(num_heads))

    @torch.no_grad()
    def init_weights(self):
        """Initialise these parameters (tensors already loaded from a checkpoint are skipped)."""
        from transformers import initialization as init

        d, m = self.init_out.shape[3], self.init_out.shape[2]
        if hasattr(self, "init_in"):
            init.normal_(self.init_in, mean=0.0, std=1.0 / math.sqrt(d))
            init.normal_(self.init_out, mean=0.0, std=1.0 / math.sqrt(m))
        else:  # linear memories M(z) = z (I + B): the identity for k, v, eta, alpha, the zero map for the output
            out = torch.zeros_like(self.init_out)
            out[:, -1] = -torch.eye(d, dtype=out.dtype, device=out.device)
            init.copy_(self.init_out, out)
        init.normal_(self.eta_readout, mean=0.0, std=1.0 / math.sqrt(d))
        # the output memory writes at eta_max / 2 from the start; the memories that generate k, v and the gates
        # (stored before it) start nearly frozen, so that keys and values are stable while the model learns to
        # use them
        bias = torch.full_like(self.eta_bias, AUX_ETA_BIAS_INIT)
        bias[:, -1] = ETA_BIAS_INIT
        init.copy_(self.eta_bias, bias)
        if hasattr(self, "alpha_readout"):
            init.normal_(self.alpha_readout, mean=0.0, std=1.0 / math.sqrt(d))
            init.constant_(self.alpha_bias, ALPHA_BIAS_INIT)


class CausalConv(nn.Conv1d):
    """The causal depthwise convolution of the q or u stream (width conv_kernel_size, no bias)."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__(channels, channels, kernel_size, groups=channels, bias=False)

    @torch.no_grad()
    def init_weights(self, noise_std: float):
        """Start as the identity plus small noise, conv(x)_t ~ x_t (skipped if the weight was loaded)."""
        from transformers import initialization as init

        w = torch.randn_like(self.weight) * noise_std
        w[..., -1] += 1.0
        init.copy_(self.weight, w)


class HopeSelfModifyingTitans(nn.Module):
    """The self-modifying Titans mixer of one HOPE layer (docs/design.md §6a)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.boxes = memory_boxes(config)
        self.num_memories = len(self.boxes)
        self.memory_dim = memory_width(config)
        self.chunk_size = config.chunk_size
        self.eta_max = config.eta_max
        self.kernel_size = config.conv_kernel_size
        self._chunk_spec = ChunkSpec(
            chunk_size=config.chunk_size,
            num_memories=self.num_memories,
            memory_dim=self.memory_dim,
            self_modifying=config.self_modifying,
            detach_self_targets=config.self_modifying and config.detach_self_targets,
            dgd=config.dgd,
            retain_toward_init=config.retention and config.retain_toward_init,
            depth=config.memory_depth,
        )
        inner = self.num_heads * self.head_dim
        hidden = config.hidden_size

        # the input streams: queries, keys (also read by the learning-rate and retention memories), values
        self.q_proj = nn.Linear(hidden, inner, bias=False)
        self.k_proj = nn.Linear(hidden, inner, bias=False)
        self.v_proj = nn.Linear(hidden, inner, bias=False)
        self.g_proj = nn.Linear(hidden, inner, bias=False)
        self.o_proj = nn.Linear(inner, hidden, bias=False)
        # causal depthwise convolutions (width conv_kernel_size) on the q, k and v streams
        self.q_conv = CausalConv(inner, self.kernel_size)
        self.k_conv = CausalConv(inner, self.kernel_size)
        self.v_conv = CausalConv(inner, self.kernel_size)
        self.out_norm_weight = nn.Parameter(torch.ones(self.head_dim))
        self.fast_init = _FastInit(config, self.num_heads, self.head_dim, self.boxes)
        self._generate_spec = GenerateSpec(boxes=tuple(self.boxes), memory_dim=self.memory_dim,
                                           eta_max=self.eta_max, retention=config.retention,
                                           depth=config.memory_depth)
        self._scan_graphs = _ScanGraphs()

    @property
    def chunk_spec(self) -> "ChunkSpec":
        """The chunk step's settings. `compile_chunk_step` is read from the config at each use (like
        `memory_cuda_graphs`, so that it can be switched on a loaded model) and applies in training mode only:
        prompts of varying lengths would make inference compile again and again."""
        compiled = self.config.compile_chunk_step and self.training
        if self._chunk_spec.compiled != compiled:
            self._chunk_spec = replace(self._chunk_spec, compiled=compiled)
        return self._chunk_spec

    # ------------------------------------------------------------------------------------------------ init
    @torch.no_grad()
    def init_memory_weights(self):
        """Initialise the parameters the generic `_init_weights` does not know (skips loaded tensors). A model's
        `_init_weights` reaches the same code module by module, since Transformers skips a module whose own
        parameters were all loaded."""
        from transformers import initialization as init

        self.fast_init.init_weights()
        init.ones_(self.out_norm_weight)
        for conv in (self.q_conv, self.k_conv, self.v_conv):
            conv.init_weights(self.config.initializer_range)

    # ------------------------------------------------------------------------------------------------ state
    def initial_state(self, batch_size: int, device=None) -> TitansState:
        """The state of a fresh sequence: every memory at its meta-learned initial state (differentiable)."""
        p = self.fast_init
        device = device or p.init_out.device
        if hasattr(p, "init_in"):
            a0 = fp32(p.init_in).unsqueeze(0).expand(batch_size, *p.init_in.shape)
        else:  # linear memories have no first layer: an empty A keeps the state's layout
            a0 = fp32(p.init_out).new_zeros(batch_size, self.num_heads, self.head_dim, 0)
        b0 = fp32(p.init_out).unsqueeze(0).expand(batch_size, *p.init_out.shape)
        channels = self.num_heads * self.head_dim
        tail = torch.zeros(batch_size, self.kernel_size - 1, channels, device=device, dtype=self.q_proj.weight.dtype)
        return TitansState(
            snapshot_in=a0,
            snapshot_out=b0,
            current_in=a0,
            current_out=b0,
            chunk_pos=torch.zeros(batch_size, dtype=torch.long, device=device),
            conv_q=tail,
            conv_k=tail.clone(),
            conv_v=tail.clone(),
        )

    # ------------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
    ) -> torch.Tensor:
        state = None
        if past_key_values is not None:
            state = past_key_values.get_titans_state(self.layer_idx)
        out, new_state = self.forward_with_state(hidden_states, attention_mask, position_ids, state)
        if past_key_values is not None:
            past_key_values.set_titans_state(self.layer_idx, new_state, num_new_tokens=hidden_states.shape[1])
        return out

    def forward_with_state(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        state: TitansState | None = None,
    ) -> tuple[torch.Tensor, TitansState]:
        """Run the layer on `hidden_states` (B, T, D) starting from `state` (None: fresh sequences).

        Returns the output (B, T, D) and the state after the last token of each row. Pad tokens (mask 0) neither
        write nor advance the chunk position; a real token with position id 0 starts a new document (reset).
        """
        bsz, seq_len, _ = hidden_states.shape
        if seq_len == 0:
            raise ValueError("hidden_states has no tokens (sequence length 0)")
        fresh = state is None
        if fresh:
            state = self.initial_state(bsz, hidden_states.device)
        elif state.batch_size != bsz:
            raise ValueError(f"state holds {state.batch_size} sequences but hidden_states has batch size {bsz}")
        real = _real_token_mask(attention_mask, bsz, seq_len, hidden_states.device)
        starts = _document_starts(position_ids, real)
        if seq_len == 1:
            return self._forward_token(hidden_states, real[:, 0], starts[:, 0] if position_ids is not None else None,
                                       state)
        layout = _Layout(real, starts, state.chunk_pos, self.chunk_size, self.kernel_size)

        q, conv_q = layout.causal_conv(self.q_proj(hidden_states), self.q_conv.weight, state.conv_q)
        uk, conv_k = layout.causal_conv(self.k_proj(hidden_states), self.k_conv.weight, state.conv_k)
        uv, conv_v = layout.causal_conv(self.v_proj(hidden_states), self.v_conv.weight, state.conv_v)
        q = l2norm(fp32(self._heads(F.silu(q))))  # (R, H, L, d) in the chunk frame
        u = self._streams(uk, uv)

        init = self.initial_state(layout.num_rows, hidden_states.device)
        start = layout.frame_state(state, init)
        # the fast weights stay in float32 under autocast too: the memory math opts out of it (and so the forward,
        # the written-out backward and its recomputation all see the same dtypes)
        with torch.autocast(device_type=q.device.type, enabled=False):
            o, final = self._scan(q, u, start, layout, fresh)
        o = layout.to_tokens(o.transpose(1, 2).reshape(layout.num_rows, layout.frame_len, -1), seq_len)
        out = self._output(o.view(bsz, seq_len, self.num_heads, self.head_dim), hidden_states)
        new_state = layout.row_state(state, final, (conv_q, conv_k, conv_v))
        return out, new_state

    def _output(self, o, hidden_states):
        """The layer's output from the reads o (B, T, H, d): per-head RMSNorm, SiLU gate, output projection."""
        bsz, seq_len, _ = hidden_states.shape
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps) * fp32(self.out_norm_weight)
        gate = F.silu(self.g_proj(hidden_states)).view(bsz, seq_len, self.num_heads, self.head_dim)
        return self.o_proj((o.to(hidden_states.dtype) * gate).reshape(bsz, seq_len, -1))

    def _forward_token(self, hidden_states, real, start, state: TitansState) -> tuple[torch.Tensor, TitansState]:
        """One token per row (decoding): `_token_step`, replayed from a CUDA graph where `memory_cuda_graphs`
        allows it (no gradients, the same batch shape a second time; see `_TokenGraph`). Inside `torch.compile`
        the step is traced as it is (the compiled model brings its own kernels and graphs)."""
        if torch.compiler.is_compiling():
            return self._token_step(hidden_states, real, start, state)
        graph = self._scan_graphs.get_token(self, hidden_states, real, start, state)
        if graph is not None:
            return graph.replay(hidden_states, real, start, state)
        return self._token_step(hidden_states, real, start, state)

    def _token_step(self, hidden_states, real, start, state: TitansState) -> tuple[torch.Tensor, TitansState]:
        """One token per row (decoding): the chunk step on a one-token piece, without the chunk frame.

        Same numbers as the general path (tested): a pad token (`real` False) reads nothing (output 0) and leaves the
        row's state as it was; a real token whose position id is 0 (`start`; None: no position ids) starts from the
        initial state. No host synchronisation, and a fixed number of kernels per token.
        """
        bsz = hidden_states.shape[0]
        if start is not None:  # a new document: the fresh state, empty convolution history
            init = self.initial_state(bsz, hidden_states.device)
            state = TitansState(**{
                name: torch.where(start.view((-1,) + (1,) * (old.dim() - 1)), fresh, old)
                for (name, old), fresh in zip(state.tensors().items(), init.tensors().values())
            })
        q, conv_q = _token_conv(self.q_proj(hidden_states), self.q_conv.weight, state.conv_q)
        uk, conv_k = _token_conv(self.k_proj(hidden_states), self.k_conv.weight, state.conv_k)
        uv, conv_v = _token_conv(self.v_proj(hidden_states), self.v_conv.weight, state.conv_v)
        q = l2norm(fp32(self._heads(F.silu(q))))  # (B, H, 1, d)
        u = self._streams(uk, uv)
        write = real.to(q.dtype).view(bsz, 1, 1)
        snap_a, snap_b = state.snapshot_in, state.snapshot_out
        anchors = self._anchors()
        with torch.autocast(device_type=q.device.type, enabled=False):
            gen = self._generate(u, snap_a, snap_b) if self.config.self_modifying else self._generate(u, None, None)
            inputs = (q, *gen, write, snap_a, snap_b, state.current_in, state.current_out, *anchors)
            if torch.is_grad_enabled():
                o, cur_a, cur_b = ChunkStep.apply(self.chunk_spec, None, *inputs)
            else:  # decoding: nothing to keep for a backward
                o, cur_a, cur_b = chunk_forward(self.chunk_spec, *inputs)
        pos = state.chunk_pos + real.long()
        complete = pos == self.chunk_size  # the chunk is complete: its end is the next snapshot
        keep = (~real).view(-1, 1, 1, 1)
        cur_a = torch.where(keep, state.current_in, cur_a)
        cur_b = torch.where(keep.unsqueeze(-1), state.current_out, cur_b)
        new_state = TitansState(
            snapshot_in=torch.where(complete.view(-1, 1, 1, 1), cur_a, snap_a),
            snapshot_out=torch.where(complete.view(-1, 1, 1, 1, 1), cur_b, snap_b),
            current_in=cur_a,
            current_out=cur_b,
            chunk_pos=torch.where(complete, 0, pos),
            conv_q=torch.where(real.view(-1, 1, 1), conv_q, state.conv_q),
            conv_k=torch.where(real.view(-1, 1, 1), conv_k, state.conv_k),
            conv_v=torch.where(real.view(-1, 1, 1), conv_v, state.conv_v),
        )
        o = o.transpose(1, 2) * write.view(bsz, 1, 1, 1)  # (B, 1, H, d); a pad token reads 0
        return self._output(o, hidden_states), new_state

    def _anchors(self):
        """The initial states that retention pulls the fast weights toward (None, None without it)."""
        p = self.fast_init
        if not self.chunk_spec.retain_toward_init:
            return None, None
        return (fp32(p.init_in) if hasattr(p, "init_in") else None), fp32(p.init_out)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        rows, length, _ = x.shape
        return x.view(rows, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _streams(self, uk: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
        """The memories' inputs after their convolutions: u = [u_k, u_v] (R, H, L, 2d) float32, the key stream
        (read by the k, eta and alpha memories) and the value stream (read by the v memory) side by side."""
        return fp32(torch.cat([self._heads(F.silu(uk)), self._heads(F.silu(uv))], dim=-1))

    # ------------------------------------------------------------------------------------------------ memory math
    # Eager inside a compiled model: the scan is a loop of written-out chunk steps (`ChunkStep`) and recomputed
    # segments. Dynamo crashed recompiling the segments (torch 2.13), and Inductor failed to build a Triton kernel
    # for the unrolled scan's backward on an H200 (torch 2.11, Triton 3.6: "PassManager::run failed").
    @torch.compiler.disable
    def _scan(self, q, u, start: TitansState, layout: "_Layout", fresh: bool):
        """The memory scan of the frame: replayed from CUDA graphs where `memory_cuda_graphs` allows it (fresh
        sequences without padding or document starts, see `_ScanGraph`), eager otherwise."""
        graph = self._scan_graphs.get(self, q, u, layout) if fresh else None
        if graph is not None and graph.inference:
            o, *final = graph.replay(q, u)
            return o, tuple(final)
        if graph is not None:
            params = [p for p in self.fast_init.parameters() if p.requires_grad]
            o, *final = _GraphedScan.apply(graph, q, u, *params)
            return o, tuple(final)
        return self._memory_scan(q, u, layout.frame_write_mask(q.dtype), start, layout)

    def _fresh_scan(self, q, u, layout: "_Layout"):
        """The scan of fresh sequences (the computation that `_ScanGraph` captures): reads and final state. The start
        state is made as `forward_with_state` makes it, so that the compiled chunk step sees the same layouts."""
        init = self.initial_state(layout.num_rows, q.device)
        start = layout.frame_state(init, init)
        o, final = self._memory_scan(q, u, layout.frame_write_mask(q.dtype), start, layout)
        return (o, *final)

    def _memory_scan(self, q, u, write, start: TitansState, layout: "_Layout"):
        """Chunk-parallel scan over the frame (Eq. 90-91): a loop over chunks, never over tokens.

        q, u: (R, H, L, d) float32; write: (R, 1, L) float (1 = real token). Returns the per-token reads
        o (R, H, L, d) and the final frame state (snapshot and current weights).

        With `recompute_memory_states` and gradients on, the chunks run in about sqrt(#chunks) segments
        (`_RecomputedSegment`): the forward runs a segment without recording anything, backward keeps the fast
        weights only at segment boundaries and re-runs a segment with gradients when it reaches it, instead of
        holding the intermediates of every chunk (numerically the same result).
        """
        sizes = [hi - lo for lo, hi in layout.chunk_bounds]
        # split once (not a slice per chunk: the backward of a slice zero-fills the whole input every time)
        q_chunks, write_chunks = q.split(sizes, dim=2), write.split(sizes, dim=-1)
        if self.config.self_modifying:
            src_chunks = u.split(sizes, dim=2)
        else:  # keys, values and gates do not depend on the memories: compute them once
            src_chunks = list(zip(*(t.split(sizes, dim=2) for t in self._generate(u, None, None))))
        chunks = list(zip(q_chunks, src_chunks, write_chunks))
        carry = (start.snapshot_in, start.snapshot_out, start.current_in, start.current_out,
                 start.snapshot_in, start.snapshot_out)
        anchors = self._anchors()
        recompute = self.config.recompute_memory_states and torch.is_grad_enabled() and len(chunks) > 1
        step = math.ceil(math.sqrt(len(chunks))) if recompute else len(chunks)
        outs = []
        for first in range(0, len(chunks), step):
            segment = chunks[first : first + step]
            if recompute:
                o_seg, carry = _RecomputedSegment.run(self, first, segment, carry, anchors, layout)
            else:
                o_seg, carry = self._scan_chunks(first, segment, carry, anchors, layout)
            outs.append(o_seg)
        o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        _, _, cur_a, cur_b, last_snap_a, last_snap_b = carry
        full = (layout.end_pos == 0).view(-1, 1, 1, 1)
        final = (
            torch.where(full, cur_a, last_snap_a),
            torch.where(full.unsqueeze(-1), cur_b, last_snap_b),
            cur_a,
            cur_b,
        )
        return o, final

    def _scan_chunks(self, first: int, chunks, carry, anchors, layout: "_Layout"):
        """Chunks `first, first + 1, ...` (each `(q, u or generated, write)`) from `carry` = (snapshot A, B,
        current A, B, snapshot used by each row's last chunk A, B); returns their reads and the new carry.
        `anchors`: the initial states that retention pulls toward (None, None without it).

        Only the rows that hold tokens in a chunk are computed (the frame's rows are ordered so that they are a
        prefix, `_Layout.rows_with_tokens`): a finished row's weights are set aside as they are, so that a packed row's
        short documents or a padded batch's short rows cost their own chunks, not the longest row's. A compiled
        chunk step computes every row (one shape: no recompilation)."""
        snap_a, snap_b, cur_a, cur_b, last_a, last_b = carry
        rows = cur_a.shape[0]
        with_tokens = layout.rows_with_tokens  # rows with tokens in chunk c (those after them ended before c)
        computed = (lambda c: rows) if layout.trivial or self.chunk_spec.compiled else with_tokens  # noqa: E731
        set_aside = []  # the current weights (A, B) of rows that finished, highest rows first
        records = []  # the snapshot (A, B) that rows used in their last chunk, highest rows first
        outs = []
        for c, (q_c, src, write_c) in enumerate(chunks, start=first):
            same = snap_a is cur_a and snap_b is cur_b  # (a scan's chunks but one that starts inside a chunk)
            n = computed(c)
            if n < cur_a.shape[0]:
                set_aside.append((cur_a[n:], cur_b[n:]))
                cur_a, cur_b = cur_a[:n], cur_b[:n]
                snap_a, snap_b = (cur_a, cur_b) if same else (snap_a[:n], snap_b[:n])
            part = (lambda t: t[:n]) if n < rows else (lambda t: t)  # noqa: E731
            weights = (part(write_c), None if same else snap_a, None if same else snap_b, cur_a, cur_b, *anchors)
            if self.config.self_modifying:  # keys, values and gates generated inside the step
                o_c, new_a, new_b = ChunkStep.apply(self.chunk_spec, self._generate_spec, part(q_c), part(src),
                                                    *weights, *self._generate_parameters())
            else:
                o_c, new_a, new_b = ChunkStep.apply(self.chunk_spec, None, part(q_c), *map(part, src), *weights)
            if n < rows:  # the finished rows hold no token here: they read nothing
                o_c = torch.cat([o_c, o_c.new_zeros((rows - n, *o_c.shape[1:]))])
            outs.append(o_c)
            # the rows whose last (possibly partial) chunk this is: remember the snapshot it used
            lo, hi = with_tokens(c + 1), with_tokens(c)
            if lo < hi:
                records.append((_rows(snap_a, lo, hi), _rows(snap_b, lo, hi)))
            cur_a, cur_b = new_a, new_b
            snap_a, snap_b = cur_a, cur_b  # the chunk is complete: its end is the next snapshot
        cur_a = _join_rows([cur_a, *(a for a, _ in reversed(set_aside))])
        cur_b = _join_rows([cur_b, *(b for _, b in reversed(set_aside))])
        # rows that end later keep their entry, those that ended in these chunks get theirs, earlier ones keep theirs
        lo, hi = with_tokens(first + len(chunks)), with_tokens(first)
        last_a = _join_rows([_rows(last_a, 0, lo), *(a for a, _ in reversed(records)), _rows(last_a, hi, rows)])
        last_b = _join_rows([_rows(last_b, 0, lo), *(b for _, b in reversed(records)), _rows(last_b, hi, rows)])
        o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return o, (cur_a, cur_b, cur_a, cur_b, last_a, last_b)

    def _generate_parameters(self):
        """`generate`'s parameters in its order, float32 (None where the config has none)."""
        return [None if p is None else fp32(p) for p in (getattr(self.fast_init, n, None) for n in GENERATE_PARAMETERS)]

    def _generate(self, u, snap_a, snap_b):
        """Keys, values, learning rates and retention gates (Eq. 87, 90) of one token (decoding), or of all chunks at
        once without self-modification (no snapshot): `generate` with this layer's settings and parameters. A scan's
        self-modifying chunks generate inside `ChunkStep` instead."""
        return generate(self._generate_spec, u, snap_a, snap_b, *self._generate_parameters())


@dataclass(frozen=True)
class GenerateSpec:
    """What `generate` needs to know of the config (hashable: `torch.compile` guards on it)."""

    boxes: tuple[str, ...]
    memory_dim: int
    eta_max: float
    retention: bool
    depth: int = 2
    feature_norm: bool = True


GENERATE_PARAMETERS = ("eta_readout", "eta_bias", "alpha_readout", "alpha_bias")


def _inputs_of_memories(spec: GenerateSpec, uk, uv):
    """The input of every adaptive memory (all but the output memory), in storage order: the value stream for the v
    memory, the key stream for the others."""
    return [uv if name == "v" else uk for name in spec.boxes[:-1]]


def generate(spec: GenerateSpec, u, snap_a, snap_b, eta_readout, eta_bias, alpha_readout, alpha_bias,
             keep: bool = False):
    """Keys, values, learning rates and retention gates (Eq. 87, 90): read from the snapshot memories of k, v, eta,
    alpha where they are adaptive (`snap_a`, `snap_b` None: none is), else straight from the streams and readouts.
    u = [u_k, u_v]: (R, H, L, 2d), the key stream (input of the k, eta and alpha memories) and the value stream
    (input of the v memory). Parameters a config does not have are None. With `keep`, also the intermediates that
    `generate_backward` reads. A gate sees its memory only through its readout w, so the memory's output is never
    formed: <u + silu(u A) B, w> = <u, w> + silu(u A) (B w) (u A instead of silu(u A) for linear memories)."""
    d = u.shape[-1] // 2
    uk, uv = u[..., :d], u[..., d:]
    n_aux, m = len(spec.boxes) - 1, spec.memory_dim
    outputs, sig, raw, hid = {}, None, None, None
    if n_aux and spec.depth == 1:  # linear memories: the features are the inputs themselves
        hid = torch.cat(_inputs_of_memories(spec, uk, uv), dim=-1)
    elif n_aux:
        pre = uk @ snap_a[..., : n_aux * m]  # (R,H,C,n_aux*m)
        if "v" in spec.boxes:  # the v memory reads the value stream
            j = spec.boxes.index("v")
            pre = torch.cat([pre[..., : j * m], uv @ snap_a[..., j * m : (j + 1) * m], pre[..., (j + 1) * m :]], -1)
        sig = torch.sigmoid(pre)
        raw = pre * sig  # silu
        hid = l2norm(raw.unflatten(-1, (n_aux, m))).flatten(-2) if spec.feature_norm else raw  # per memory
    # the k and v memories (stored first), one product each: a product over a slice of the memories would copy
    # their weights (their batch dimensions do not merge)
    for j in range(_vector_memories(spec)):
        src = uv if spec.boxes[j] == "v" else uk
        outputs[spec.boxes[j]] = src + hid[..., j * m : (j + 1) * m] @ snap_b[:, :, j]
    k_raw, v_raw = outputs.get("k", uk), outputs.get("v", uv)
    k, v = l2norm(k_raw), l2norm(v_raw)
    eta_gate = torch.sigmoid(_gate_readout(spec, "eta", uk, hid, snap_b, eta_readout, eta_bias))
    eta = spec.eta_max * eta_gate
    alpha_pre = None
    if spec.retention:
        alpha_pre = _gate_readout(spec, "alpha", uk, hid, snap_b, alpha_readout, alpha_bias)
        log_alpha = F.logsigmoid(alpha_pre)
    else:
        log_alpha = eta.new_zeros(eta.shape[:-1])
    if not keep:
        return k, v, eta, log_alpha
    saved = dict(sig=sig, raw=raw, hid=hid, k_raw=k_raw, v_raw=v_raw, k=k, v=v, eta_gate=eta_gate, alpha_pre=alpha_pre)
    return k, v, eta, log_alpha, saved


def _vector_memories(spec: GenerateSpec) -> int:
    """How many of the adaptive memories are read as vectors (k, v: stored first); the others are gates."""
    return sum(name in ("k", "v") for name in spec.boxes)


def _gate_readout(spec: GenerateSpec, name, u, hid, snap_b, readout, bias):
    """A gate's pre-activations <src, w_g> + b_g (R, H, L, G) for readouts w (H, G, d) and biases (H, G) ((R, H, L)
    for a readout (H, d)), src = u or, where the gate is adaptive, its memory's output u + h B, taken as
    <u, w> + h (B w) (hid: the memories' hidden features h)."""
    w = fp32(readout)
    single = w.dim() == 2
    w = w.unsqueeze(1) if single else w  # (H, G, d)
    value = torch.einsum("rhld,hgd->rhlg", u, w) + fp32(bias).view(w.shape[0], -1)[:, None]
    if name in spec.boxes:
        j, m = spec.boxes.index(name), spec.memory_dim
        value = value + hid[..., j * m : (j + 1) * m] @ (snap_b[:, :, j] @ w.transpose(-1, -2))
    return value.squeeze(-1) if single else value


def _gate_readout_backward(spec: GenerateSpec, name, u, hid, snap_b, readout, d_value, d_hid, d_snap_b):
    """The backward of `_gate_readout` for d_value: returns the gradients of u (its direct part) and of the readout
    and bias; the memory's hidden gradient goes into `d_hid` (a dict by memory index), its B's into `d_snap_b`."""
    w = fp32(readout)
    single = w.dim() == 2
    w = w.unsqueeze(1) if single else w  # (H, G, d)
    d_value = d_value.unsqueeze(-1) if single else d_value  # (R, H, L, G)
    d_u = torch.einsum("rhlg,hgd->rhld", d_value, w)
    d_w = torch.einsum("rhlg,rhld->hgd", d_value, u)
    if name in spec.boxes:
        j, m = spec.boxes.index(name), spec.memory_dim
        b = snap_b[:, :, j]  # (R,H,m,d)
        d_hid[j] = d_value @ (b @ w.transpose(-1, -2)).transpose(-1, -2)
        weighted = hid[..., j * m : (j + 1) * m].transpose(-1, -2) @ d_value  # sum_t h_t^T d_t: (R,H,m,G)
        d_w = d_w + torch.einsum("rhmg,rhmd->hgd", weighted, b)
        d_snap_b[:, :, j].add_(weighted @ w)
    d_bias = d_value.sum((0, 2))
    return d_u, (d_w.squeeze(1) if single else d_w), (d_bias.squeeze(-1) if single else d_bias)


def _l2norm_backward(y, x, d_y):
    """The gradient of x for y = l2norm(x): (d_y - y <y, d_y>) / sqrt(|x|^2 + eps)."""
    return torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + NORM_EPS) * (d_y - y * (y * d_y).sum(-1, keepdim=True))


def generate_backward(spec: GenerateSpec, u, snap_a, snap_b, params, t, d_k, d_v, d_eta, d_log_alpha, d_snap_a,
                      d_snap_b):
    """The vector-Jacobian product of `generate` with snapshot memories, written out (tested against autograd).

    `params` are its parameters (None where the config has none), `t` its intermediates (`keep=True`), `d_*` the
    gradients of its outputs. Returns the gradients of u and of the parameters (summed over the rows); the
    snapshot's are added into `d_snap_a` and `d_snap_b` in place (weight-sized, so no new ones are made).
    """
    eta_readout, eta_bias, alpha_readout, alpha_bias = params
    d = u.shape[-1] // 2
    uk, uv = u[..., :d], u[..., d:]
    n_aux, m = len(spec.boxes) - 1, spec.memory_dim
    hid = t["hid"]
    d_hid = {}  # by memory index: the gradients of each memory's block of hid
    d_params = [None] * len(params)
    gate = t["eta_gate"]
    d_eta_pre = d_eta * spec.eta_max * gate * (1 - gate)  # (R,H,C)
    d_uk, d_params[0], d_params[1] = _gate_readout_backward(spec, "eta", uk, hid, snap_b, eta_readout, d_eta_pre,
                                                             d_hid, d_snap_b)
    if spec.retention:
        d_alpha_pre = d_log_alpha * torch.sigmoid(-t["alpha_pre"])  # logsigmoid' = 1 - sigmoid
        d_u_alpha, d_params[2], d_params[3] = _gate_readout_backward(spec, "alpha", uk, hid, snap_b, alpha_readout,
                                                                     d_alpha_pre, d_hid, d_snap_b)
        d_uk = d_uk + d_u_alpha
    d_src = {"k": _l2norm_backward(t["k"], t["k_raw"], d_k), "v": _l2norm_backward(t["v"], t["v_raw"], d_v)}
    d_uk = d_uk + d_src["k"]  # k = l2norm(u_k (+ the k memory's output)), likewise v
    d_uv = d_src["v"]
    for j in range(_vector_memories(spec)):  # mem = src + silu(src A) B for k and v, one memory at a time
        d_mem = d_src[spec.boxes[j]]
        d_hid[j] = d_mem @ snap_b[:, :, j].transpose(-1, -2)
        _plus_product(d_snap_b[:, :, j], hid[..., j * m : (j + 1) * m].transpose(-1, -2), d_mem)
    if n_aux and spec.depth == 1:  # hid = the memories' inputs
        for j, name in enumerate(spec.boxes[:-1]):
            if name == "v":
                d_uv = d_uv + d_hid[j]
            else:
                d_uk = d_uk + d_hid[j]
    elif n_aux:
        sig, raw = t["sig"], t["raw"]
        d_raw = torch.cat([d_hid[j] for j in range(n_aux)], dim=-1)
        if spec.feature_norm:  # hid = l2norm(silu(pre)) per memory
            d_raw = _l2norm_backward(hid.unflatten(-1, (n_aux, m)), raw.unflatten(-1, (n_aux, m)),
                                     d_raw.unflatten(-1, (n_aux, m))).flatten(-2)
        d_pre = d_raw * torch.addcmul(sig, raw, 1 - sig)  # silu'
        if "v" in spec.boxes:  # the v memory's block came from the value stream
            j = spec.boxes.index("v")
            block = slice(j * m, (j + 1) * m)
            d_pre_v = d_pre[..., block].clone()
            d_pre[..., block] = 0
            d_uv = d_uv + d_pre_v @ snap_a[..., block].transpose(-1, -2)
            _plus_product(d_snap_a[..., block], uv.transpose(-1, -2), d_pre_v)
        d_uk = d_uk + d_pre @ snap_a[..., : n_aux * m].transpose(-1, -2)
        _plus_product(d_snap_a[..., : n_aux * m], uk.transpose(-1, -2), d_pre)
    return torch.cat([d_uk, d_uv], dim=-1), d_params


class _RecomputedSegment(torch.autograd.Function):
    """Activation checkpointing of a run of chunks, specialised to the scan: the forward runs `_scan_chunks` under
    `no_grad` (no graph, nothing stored but the segment's inputs); backward re-runs it with gradients and
    differentiates it with `torch.autograd.grad`, returning the gradients of its inputs and of the layer's
    `fast_init` parameters (passed as inputs, so that they are accumulated by the engine like any other)."""

    @staticmethod
    def run(layer, first, segment, carry, anchors, layout):
        flat, tree = tree_flatten((segment, carry, anchors))
        params = [p for p in layer.fast_init.parameters() if p.requires_grad]
        outputs = _RecomputedSegment.apply(layer, first, layout, tree, len(flat), *flat, *params)
        o, cur_a, cur_b, last_a, last_b = outputs
        return o, (cur_a, cur_b, cur_a, cur_b, last_a, last_b)  # a segment ends on a complete chunk: snapshot = current

    @staticmethod
    def _scan(layer, first, layout, tree, flat):
        segment, carry, anchors = tree_unflatten(list(flat), tree)
        o, (_, _, cur_a, cur_b, last_a, last_b) = layer._scan_chunks(first, segment, carry, anchors, layout)
        return o, cur_a, cur_b, last_a, last_b

    @staticmethod
    def forward(ctx, layer, first, layout, tree, num_flat, *tensors):
        flat = tensors[:num_flat]
        ctx.layer, ctx.first, ctx.layout, ctx.tree, ctx.num_flat = layer, first, layout, tree, num_flat
        # which input each one repeats (snapshot and current weights are one tensor after a complete chunk), so that
        # the recomputation sees the same aliasing as this pass
        first_of = {}
        ctx.alias = [i if t is None else first_of.setdefault(id(t), i) for i, t in enumerate(flat)]
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            outputs = _RecomputedSegment._scan(layer, first, layout, tree, flat)
        # an output that is one of the inputs (a row's last snapshot set before this segment) must be a new tensor
        ids = {id(t) for t in tensors if t is not None}
        return tuple(t.clone() if id(t) in ids else t for t in outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        tensors = ctx.saved_tensors
        flat = []
        for i, t in enumerate(tensors[: ctx.num_flat]):
            if ctx.alias[i] != i:
                flat.append(flat[ctx.alias[i]])
            else:
                flat.append(None if t is None else t.detach().requires_grad_(t.requires_grad))
        params = list(tensors[ctx.num_flat :])
        with torch.enable_grad():
            outputs = _RecomputedSegment._scan(ctx.layer, ctx.first, ctx.layout, ctx.tree, flat)
        # a repeated input gets its gradient once (autograd sums over the places it was passed)
        wanted = [i for i, t in enumerate(flat + params)
                  if t is not None and t.requires_grad and (i >= ctx.num_flat or ctx.alias[i] == i)]
        pairs = [(out, g) for out, g in zip(outputs, grad_outputs) if g is not None and out.requires_grad]
        grads = [None] * len(tensors)
        if wanted and pairs:
            found = torch.autograd.grad(
                [out for out, _ in pairs], [(flat + params)[i] for i in wanted], [g for _, g in pairs],
                allow_unused=True,
            )
            for i, g in zip(wanted, found):
                grads[i] = g
        return (None, None, None, None, None, *grads)


# ---------------------------------------------------------------------------------------------------- CUDA graphs
def _warm_up(step):
    """Run `step` twice on a side stream before a capture (cuBLAS handles, the allocator), as the CUDA graph docs
    prescribe."""
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


class _ScanGraph:
    """One layer's memory scan of fresh sequences (`_fresh_scan`) captured as CUDA graphs for one input shape
    (`capture`): for training its forward and its backward, for a pass without gradients (`inference`: evaluation)
    its forward alone. A step on a GPU is launch-bound (~560 small kernels per chunk and layer in training); a
    replay launches the whole scan at once. Inputs are copied into the captured buffers and results copied out, so
    nothing a caller holds is ever overwritten by a later replay."""

    def __init__(self, layer: "HopeSelfModifyingTitans", q, u, layout: "_Layout", inference: bool = False):
        # weakly: the layer holds this graph (a cycle would keep the graphs' memory until a garbage collection)
        self.layer = weakref.ref(layer)
        self.layout = layout  # the captured kernels read its tensors: keep them alive
        self.inference = inference
        named = [(name, p) for name, p in layer.fast_init.named_parameters() if inference or p.requires_grad]
        self.param_ptrs = [p.data_ptr() for _, p in named]  # the storage the graphs read
        # The graphs read the parameters' storage through aliases: leaves of their own, whose gradient accumulators
        # are not those of the running training step (made on another stream, they make the capture fail).
        self.aliases = {name: p.detach().requires_grad_(not inference) for name, p in named}
        self.q = q.detach().clone().requires_grad_(q.requires_grad and not inference)
        self.u = u.detach().clone().requires_grad_(u.requires_grad and not inference)
        self.needs_grad = [t.requires_grad for t in (self.q, self.u, *self.aliases.values())]
        self.pending = None  # weak reference to the token of the replay whose backward has not run yet

    def forward(self):
        """The computation the forward graph holds: reads and final state from the captured inputs."""
        layer = self.layer()
        with _parameters_replaced(layer.fast_init, self.aliases):
            return layer._fresh_scan(self.q, self.u, self.layout)

    def backward(self, outputs, grad_outputs):
        """The computation the backward graph holds: gradients of q, u and the parameters (None where not needed)."""
        wrt = [t for t in (self.q, self.u, *self.aliases.values()) if t.requires_grad]
        with _parameters_replaced(self.layer().fast_init, self.aliases):  # recomputation in backward reads them too
            found = iter(torch.autograd.grad(outputs, wrt, grad_outputs, allow_unused=True))
        return [next(found) if needed else None for needed in self.needs_grad]

    @staticmethod
    def zero_grad_outputs(outputs):
        """Buffers for the gradients of (reads, final state), the reads' in the layout in which `forward_with_state`
        hands them back ((R, L, H, d) memory, from its transpose): the compiled chunk step then sees the strides of
        the eager step and reuses its code."""
        o, *final = outputs
        reads = torch.zeros_like(o.transpose(1, 2), memory_format=torch.contiguous_format).transpose(1, 2)
        return [reads, *(torch.zeros_like(t) for t in final)]

    def capture(self) -> "_ScanGraph":
        """Record `forward` and (unless `inference`) `backward` into graphs of one memory pool, after a warm-up, on
        the inputs' device (a model split over GPUs has layers on devices other than the current one)."""
        with torch.cuda.device(self.q.device):
            return self._record()

    def _record(self) -> "_ScanGraph":
        def step():  # nothing of the warm-up may outlive it: its gradient accumulators belong to the side stream
            with torch.set_grad_enabled(not self.inference):
                outputs = self.forward()
                if not self.inference:
                    self.backward(outputs, self.zero_grad_outputs(outputs))

        _warm_up(step)
        pool = torch.cuda.graph_pool_handle()
        self.forward_graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may use CUDA meanwhile
        with torch.set_grad_enabled(not self.inference), \
                torch.cuda.graph(self.forward_graph, pool=pool, capture_error_mode="thread_local"):
            self.outputs = self.forward()
        if not self.inference:
            self.backward_graph = torch.cuda.CUDAGraph()
            self.grad_outputs = self.zero_grad_outputs(self.outputs)
            with torch.cuda.graph(self.backward_graph, pool=pool, capture_error_mode="thread_local"):
                self.grads = self.backward(self.outputs, self.grad_outputs)
        # the buffers alone: the capture's autograd graph would keep the layer (a cycle) and its memory alive
        self.outputs = tuple(t.detach() for t in self.outputs)
        return self

    def replay(self, q, u):
        """A pass without gradients (`inference` graphs): q, u in, replay, copies of the reads and final state out."""
        self.q.copy_(q)
        self.u.copy_(u)
        self.forward_graph.replay()
        return tuple(t.clone() for t in self.outputs)

    def busy(self) -> bool:
        """A replay's backward is still to come (its autograd graph is alive): another replay would overwrite the
        activations that backward reads."""
        return self.pending is not None and self.pending() is not None


class _TokenGraph:
    """One layer's decoding step (`_token_step`) for one batch shape, captured as a CUDA graph: eagerly, a token
    launches some hundred small kernels per Titans layer. A replay copies the token's hidden states, masks and the
    layer's state into the captured buffers and copies the output and the new state out (the state is replaced,
    never updated in place, as in the eager step: a cache that a caller holds stays as it was)."""

    def __init__(self, layer: "HopeSelfModifyingTitans", hidden_states, real, start, state: TitansState):
        self.layer = weakref.ref(layer)  # weakly, as `_ScanGraph`
        self.names = list(state.tensors())
        self.inputs = [t.detach().clone() for t in (hidden_states, real, *state.tensors().values())]
        self.start = None if start is None else start.detach().clone()

    def run(self):
        """The computation the graph holds: the output and the new state's tensors from the captured inputs."""
        hidden_states, real, *tensors = self.inputs
        out, state = self.layer()._token_step(hidden_states, real, self.start,
                                              TitansState(**dict(zip(self.names, tensors))))
        return (out, *state.tensors().values())

    def capture(self) -> "_TokenGraph":
        """Record `run` into the graph after a warm-up on a side stream, on the inputs' device (as `_ScanGraph`)."""
        with torch.cuda.device(self.inputs[0].device):
            return self._record()

    def _record(self) -> "_TokenGraph":
        _warm_up(self.run)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = self.run()
        return self

    def replay(self, hidden_states, real, start, state: TitansState) -> tuple[torch.Tensor, TitansState]:
        """`_token_step(hidden_states, real, start, state)` from the graph: inputs in, replay, copies out."""
        for buffer, t in zip(self.inputs, (hidden_states, real, *state.tensors().values())):
            buffer.copy_(t)
        if start is not None:
            self.start.copy_(start)
        self.graph.replay()
        out, *tensors = (t.clone() for t in self.outputs)
        return out, TitansState(**dict(zip(self.names, tensors)))


def _under_checkpointing() -> bool:
    """Saved-tensor hooks are on (non-reentrant activation checkpointing, Transformers' default, or offloading) or
    a backward pass is running (reentrant checkpointing's recomputation). The scan then runs eagerly: the
    checkpointed pass and its recomputation must save the same tensors (a replay saves none), and no graph is
    captured from inside the autograd engine."""
    try:  # private functions of torch: where they are missing or changed, assume the worst
        return (torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
                or torch._C._current_graph_task_id() != -1)
    except (AttributeError, TypeError, RuntimeError):
        return True


@contextlib.contextmanager
def _parameters_replaced(module: nn.Module, tensors: dict):
    """`module`'s own parameters read as `tensors` (by name) inside the block."""
    saved = dict(module._parameters)
    module._parameters.update(tensors)
    try:
        yield
    finally:
        module._parameters.update(saved)


class _Pending:
    """Lives exactly as long as the autograd graph of one replay (kept by its context)."""


class _GraphedScan(torch.autograd.Function):
    """Replays a `_ScanGraph`: forward copies q, u in and the reads and final state out; backward copies the output
    gradients in and the input and parameter gradients out."""

    @staticmethod
    def forward(ctx, graph: _ScanGraph, q, u, *params):
        graph.q.copy_(q)
        graph.u.copy_(u)
        graph.forward_graph.replay()
        ctx.graph, ctx.pending, ctx.params = graph, _Pending(), params
        graph.pending = weakref.ref(ctx.pending)
        return tuple(t.clone() for t in graph.outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs):
        graph = ctx.graph
        # A replay happens only while no earlier one awaits its backward (`busy`), so a context whose backward has
        # run (pending None) is the only one whose buffers a later forward may have rewritten.
        if ctx.pending is None:
            raise RuntimeError(
                "memory_cuda_graphs: a backward pass through the Titans memory's CUDA graphs can run once, before the "
                "next forward pass (its activations live in the graphs' buffers); a second backward (retain_graph) "
                "needs memory_cuda_graphs=False"
            )
        if [p.data_ptr() for p in ctx.params] != graph.param_ptrs:
            raise RuntimeError(
                "memory_cuda_graphs: the Titans memory's parameters moved to other storage between the forward and "
                "the backward pass (parameter sharding such as FSDP or DeepSpeed ZeRO-3 does this), so the captured "
                "backward would read stale memory; set memory_cuda_graphs=False for such training"
            )
        for buffer, grad in zip(graph.grad_outputs, grad_outputs):
            buffer.copy_(grad)
        graph.backward_graph.replay()
        graph.pending = ctx.pending = None
        # copies: a parameter's gradient is kept (`.grad`) and the next replay rewrites the captured buffers
        return (None, *(None if g is None else g.clone() for g in graph.grads))


class _ScanGraphs:
    """The CUDA graphs of one layer (its scans and its decoding step), by input shape and parameter storage. At most
    `MAX_SHAPES` shapes with gradients and as many of each kind without: a capture costs about 2.6 eager steps, so a
    stream of ever new shapes would run slower than eager; shapes beyond these run eagerly. Without gradients
    (evaluation, the prompt of `generate`) a shape is captured when it comes the second time: an evaluation loop
    repeats its batch shape, while prompts of one-off lengths would pay a capture each for nothing. Decoding steps
    (`_TokenGraph`, one token per row, no gradients) likewise, from a batch shape's second token on. Not copied by
    `copy.deepcopy` or pickling: a copy captures its own."""

    MAX_SHAPES = 4

    def __init__(self):
        self.graphs: dict = {}
        self.seen: dict = {}  # shapes without gradients met once, oldest first (the last 4 * MAX_SHAPES)

    def __deepcopy__(self, memo):
        return _ScanGraphs()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def get(self, layer: "HopeSelfModifyingTitans", q, u, layout: "_Layout") -> _ScanGraph | None:
        """The graph for these inputs (captured on first use with gradients, on second use without), or None where
        the eager scan must run: graphs off, not on CUDA, padding or document starts, checkpointing, or the graph's
        previous replay still awaits its backward (two forward passes before one backward)."""
        if not (layer.config.memory_cuda_graphs and q.is_cuda and layout.trivial and layout.pad_front == 0) \
                or _under_checkpointing():
            return None
        params = list(layer.fast_init.parameters())
        inference = not (torch.is_grad_enabled()
                         and (q.requires_grad or u.requires_grad or any(p.requires_grad for p in params)))
        if inference:
            # buffers made under inference mode can only be written under it: its graphs are apart
            shape = ("inference", tuple(q.shape), tuple(u.shape), q.dtype, q.device,
                     torch.is_inference_mode_enabled())
            return self._get_without_gradients(shape, layer, lambda: _ScanGraph(layer, q, u, layout, inference=True))
        shape = ("training", tuple(q.shape), tuple(u.shape), q.dtype, q.device, layer.config.recompute_memory_states,
                 layer.config.compile_chunk_step, q.requires_grad, u.requires_grad)
        key = (shape, self._storage(layer, with_grad=True))
        graph = self.graphs.get(key)
        if graph is None:
            if not self.admit(key):
                return None
            graph = self.graphs[key] = _ScanGraph(layer, q, u, layout).capture()
        return None if graph.busy() else graph

    def get_token(self, layer: "HopeSelfModifyingTitans", hidden_states, real, start, state: TitansState):
        """The decoding step's graph for these inputs (captured on the second use of their shapes), or None where
        the eager step must run: graphs off, not on CUDA, gradients on."""
        if not (layer.config.memory_cuda_graphs and hidden_states.is_cuda) or torch.is_grad_enabled():
            return None
        device = hidden_states.device.type
        shape = ("token", tuple(hidden_states.shape), hidden_states.dtype, hidden_states.device, start is None,
                 torch.is_autocast_enabled(device), torch.get_autocast_dtype(device),
                 torch.is_inference_mode_enabled(), *((tuple(t.shape), t.dtype) for t in state.tensors().values()))
        return self._get_without_gradients(shape, layer, lambda: _TokenGraph(layer, hidden_states, real, start, state))

    @staticmethod
    def _storage(layer, with_grad: bool) -> tuple:
        """Where every parameter of the layer lives (and, for graphs with gradients, which ones require them): a
        graph reads the storage it was captured with. All of the layer's parameters, not only those a scan reads:
        the decoding step reads the projections too, and one list lets graphs of every kind be compared."""
        return tuple((p.data_ptr(), p.requires_grad and with_grad) for p in layer.parameters())

    def _get_without_gradients(self, shape, layer, make):
        """The graph of `shape` (its kind first: "inference" or "token"), made by `make` and captured when the
        shape comes the second time; None before that and beyond `MAX_SHAPES` of its kind."""
        key = (shape, self._storage(layer, with_grad=False))
        graph = self.graphs.get(key)
        if graph is None:
            if key not in self.seen:
                if len(self.seen) >= 4 * self.MAX_SHAPES:  # forget the oldest: one-off prompt lengths pile up
                    del self.seen[next(iter(self.seen))]
                self.seen[key] = None
                return None
            if not self.admit(key):
                return None
            graph = self.graphs[key] = make().capture()
        return graph

    def admit(self, key) -> bool:
        """May a graph be captured for `key` = ((kind, shape...), ((parameter address, requires_grad), ...))? Graphs
        that read other storage than the parameters' present one are dropped first (they can no longer be replayed);
        then a new shape is admitted while fewer than `MAX_SHAPES` of its kind ("training", "inference": a scan
        without gradients, "token": a decoding step) are held."""
        storage = [ptr for ptr, _ in key[1]]
        for old in [k for k in self.graphs if [ptr for ptr, _ in k[1]] != storage]:
            del self.graphs[old]
        kind = key[0][0]
        if sum(k[0][0] == kind for k in self.graphs) < self.MAX_SHAPES:
            return True
        if kind == "training":  # shapes without gradients beyond these run eagerly without a word (prompt lengths)
            logger.warning_once(
                f"memory_cuda_graphs: more than {self.MAX_SHAPES} input shapes for the Titans memory; new shapes run "
                "eagerly (pack or pad the batches to a few fixed lengths to replay graphs for all of them)"
            )
        return False


# ---------------------------------------------------------------------------------------------------- chunk step
@dataclass(frozen=True)
class ChunkSpec:
    """What the chunk step needs to know of the config (hashable, so that `torch.compile` can guard on it)."""

    chunk_size: int
    num_memories: int
    memory_dim: int
    self_modifying: bool
    detach_self_targets: bool
    dgd: bool
    retain_toward_init: bool
    depth: int = 2  # memory_depth: 2 = residual MLP memories (`chunk_forward`), 1 = linear (`linear_chunk_forward`)
    feature_norm: bool = True  # the MLP memories' hidden features are l2-normalised: sigma = l2norm o silu
    compiled: bool = False  # `compile_chunk_step` in training mode: `ChunkStep` runs the compiled `chunk_functions`


def _per_head(x, w):
    """x (R, H, L, X) @ w (H, X, Y) -> (R, H, L, Y) as one product per head over all rows' tokens (`x @ w` would
    first copy w for every row: a weight-sized copy for an anchor)."""
    rows, heads, length, width = x.shape
    out = torch.matmul(x.transpose(0, 1).reshape(heads, rows * length, width), w)
    return out.view(heads, rows, length, -1).transpose(0, 1)


def _per_memory(x, w):
    """x (R, H, n, L, X) @ w (H, n, X, Y) -> (R, H, n, L, Y) as one product per head and memory over all rows'
    tokens (as `_per_head`)."""
    rows, heads, n, length, width = x.shape
    out = torch.matmul(x.permute(1, 2, 0, 3, 4).reshape(heads * n, rows * length, width), w.reshape(heads * n, width, -1))
    return out.view(heads, n, rows, length, -1).permute(2, 0, 1, 3, 4)


def _plus_product(base, a, b, sign=1.0):
    """base += sign * (a @ b) in place, for batched a (..., X, L), b (..., L, Y) and a base (..., X, Y) that
    nothing else reads (a new tensor, or a block of one whose batch dimensions merge into one): the product
    accumulates into base inside one GEMM (`baddbmm_`), with no weight-sized result or copy of base made."""
    x, y = base.shape[-2:]
    base.view(-1, x, y).baddbmm_(a.reshape(-1, x, a.shape[-1]), b.reshape(-1, b.shape[-2], y), alpha=sign)
    return base


def _decayed_start(cur, anchor, decay):
    """The start that a chunk's update accumulates into: decay * (cur - anchor) + anchor with retention toward the
    anchor, decay * cur without it (decay (R, H, 1)). One weight-sized pass, a new tensor."""
    decay = decay.view(decay.shape[:2] + (1,) * (cur.dim() - 2))
    return decay * cur if anchor is None else torch.lerp(anchor, cur, decay)


def _start_gradient(d_end, cur, anchor, decay):
    """For the gradient d_end of a chunk's end weights: the gradient of its start, decay * d_end, and the dot
    product <d_end, cur - anchor> per row and head (the decay's gradient, up to a factor), in one new tensor."""
    out = cur * d_end if anchor is None else (cur - anchor).mul_(d_end)
    dot = out.flatten(2).sum(-1)
    torch.mul(d_end, decay.view(decay.shape[:2] + (1,) * (cur.dim() - 2)), out=out)
    return out, dot


def _snapshot_weights(snap_a, snap_b, cur_a, cur_b):
    """(same, A, B) of a chunk's snapshot: a snapshot given as None is the current weights (same = True)."""
    same = snap_a is None
    return (True, cur_a, cur_b) if same else (False, snap_a, snap_b)


def _rows(x, lo, hi):
    """Rows lo..hi-1 of x: x itself when that is all of them."""
    return x if lo == 0 and hi == x.shape[0] else x[lo:hi]


def _join_rows(parts):
    """The non-empty parts stacked along the rows; a single part is returned as it is (no copy)."""
    parts = [p for p in parts if p.shape[0]]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _tokens_last(x):
    """(R, H, C, n, X) -> (R, H, n, X, C): per memory, the token axis as a product's inner dimension."""
    return x.permute(0, 1, 3, 4, 2)


def mlp_chunk_forward(spec: ChunkSpec, q, k, v, eta, log_alpha, write, snap_a, snap_b, cur_a, cur_b, anchor_a,
                      anchor_b, keep: bool = False):
    """One chunk of the rule for MLP memories (docs/design.md §6a), exactly, for all memories and heads at once
    (Eq. 84-91).

    q, k, v: (R, H, L, d); eta (R, H, L, n): one learning rate per memory; log_alpha (R, H, L); write (R, 1, L)
    (1 = real token); snapshot and current weights A (R, H, d, n*m) and B (R, H, n, m, d), the snapshot None where
    it is the current weights (every chunk
    of a scan but one that starts inside a chunk); anchors (the initial states, H-shaped) or None. Returns the reads
    o (R, H, L, d) and the weights after the chunk; with `keep`, also every intermediate (`chunk_backward` uses them).
    Differentiable with autograd (the reference for `chunk_backward`); the model calls it through `ChunkStep`.
    """
    C, n, m = spec.chunk_size, spec.num_memories, spec.memory_dim
    length = q.shape[2]  # C, or fewer for a piece that starts or ends inside a chunk
    # a snapshot that is the current weights: the keys' product with them is among the targets'
    same, snap_a, snap_b = _snapshot_weights(snap_a, snap_b, cur_a, cur_b)
    eta = eta * write.unsqueeze(-1)  # pad tokens: no write ...
    log_alpha = log_alpha * write  # ... and no decay

    # self-generated targets (Eq. 84) or, without self-modification, the value itself; the gradients of
    # 1/2 ||M_s(k) - vhat||^2 at the snapshot (Eq. 88). v and k share one product.
    z = torch.cat([v, k], dim=2) if spec.self_modifying else k
    pre_all = (z @ snap_a).unflatten(-1, (n, m))  # (R,H,2L or L,n,m): v's rows first
    sig_all = torch.sigmoid(pre_all)
    raw_all = pre_all * sig_all  # silu
    nrm_all = torch.rsqrt(raw_all.pow(2).sum(-1, keepdim=True) + NORM_EPS) if spec.feature_norm else None
    h_all = raw_all * nrm_all if spec.feature_norm else raw_all  # the hidden features sigma(z A)
    first_k = pre_all.shape[2] - length
    pre, sig, h = pre_all[:, :, first_k:], sig_all[:, :, first_k:], h_all[:, :, first_k:]  # the keys' rows
    raw = raw_all[:, :, first_k:]
    # M(k) - M(v) = (k - v) + (silu(k A) - silu(v A)) B: one product with B instead of two
    # the other memories regress onto their self-generated targets M_s(v), the output memory onto v itself
    h_e = torch.cat([h[..., :-1, :] - h_all[:, :, :length, :-1], h[..., -1:, :]], -2) if spec.self_modifying else h
    e = torch.einsum("rhcnm,rhnmd->rhcnd", h_e, snap_b) + (k - v).unsqueeze(-2)  # (R,H,L,n,d)
    if spec.self_modifying and spec.detach_self_targets:  # same values; the gradient reaches e through M(k) only
        mk = k.unsqueeze(-2) + torch.einsum("rhcnm,rhnmd->rhcnd", h, snap_b)
        e = e.detach() + (mk - mk.detach())
        h_e = h  # the hidden activations whose product with B reaches e with a gradient
    dpre0 = torch.addcmul(sig, raw, 1 - sig)  # silu'(pre) = sig + silu(pre) (1 - sig)
    b_e = torch.einsum("rhcnd,rhnmd->rhcnm", e, snap_b)
    if spec.feature_norm:  # the gradient of the pre-activations through the normalisation: (I - h h^T) / |silu(pre)|
        dpre = dpre0 * nrm_all[:, :, first_k:]
        delta = (b_e - h * (h * b_e).sum(-1, keepdim=True)) * dpre
    else:
        dpre = dpre0
        delta = b_e * dpre

    # step sizes: DGD's curvature normalisation, and by the C gradients taken at one snapshot
    h_sq = h.pow(2).sum(-1)
    eta1 = eta / (1 + eta * h_sq)  # the exact (proximal) step of the output layer's delta rule: (R,H,L,n)
    col_norms = snap_b.pow(2).sum(-1)  # |W1_s[:, j]|^2: (R,H,n,m)
    dpre_sq = dpre.pow(2)
    curv = (dpre_sq * col_norms.unsqueeze(2)).sum(-1)
    eta2 = eta / (1 + C * eta * curv)

    # decays in log space: gamma_t = prod_{i<=t} alpha_i
    # One token with nothing kept (decoding): no pair i < t inside the piece, so the decay matrix, the triangular
    # solve and the in-piece read terms vanish exactly (gamma_0 = 1, gamma_L / gamma_1 = 1); skip them.
    single = length == 1 and not keep
    if single:
        e_end = torch.exp(log_alpha)  # (R,H,1)
    else:
        g = torch.cumsum(log_alpha, dim=-1)  # (R,H,L)
        g_prev = g - log_alpha
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril(-1)
        decay = torch.exp((g_prev.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(~causal, -math.inf))  # (R,H,L,L) i<t
        g_end = g[..., -1:]
        to_end = torch.exp(g_end - g)  # gamma_L / gamma_i
        e_prev, e_end = torch.exp(g_prev), torch.exp(g_end)

    # ---- W2 (A): X_t = (alpha_t I - eta'_t k_t k_t^T) X_{t-1} + k_t u_t, X = A - anchor (gated delta rule), per
    # memory (each has its own learning rate): the memories' blocks as (R,H,L,n,m)
    force = -(eta2.unsqueeze(-1) * delta)  # (R,H,L,n,m)
    eta_p = k_anchor = k_x0 = kk = ut = None
    if spec.dgd:
        eta_p = eta / (1 + eta * k.pow(2).sum(-1, keepdim=True))  # the erase: (R,H,L,n)
        if spec.retain_toward_init:
            k_anchor = _per_head(k, anchor_a).unflatten(-1, (n, m))
            force = force - eta_p.unsqueeze(-1) * k_anchor
        k_cur = pre_all[:, :, first_k:] if same else (k @ cur_a).unflatten(-1, (n, m))
        k_x0 = k_cur if k_anchor is None else k_cur - k_anchor  # k @ x0
        if single:
            r = force - eta_p.unsqueeze(-1) * k_x0
        else:
            rhs = force - (eta_p * e_prev.unsqueeze(-1)).unsqueeze(-1) * k_x0
            kk = k @ k.transpose(-1, -2)
            lower = eta_p.transpose(2, 3).unsqueeze(-1) * (decay * kk).unsqueeze(2)  # (R,H,n,L,L)
            # UT transform: r = (I + lower)^-1 rhs, through the (L, L) inverse (one solve against the identity and a
            # product: a solve against the m-wide rhs runs at a few GFLOP/s); backward reuses it transposed
            eye = torch.eye(length, dtype=lower.dtype, device=lower.device).expand_as(lower)
            ut = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
            r = (ut @ rhs.transpose(2, 3)).transpose(2, 3)
    else:
        r = force
    r = r.flatten(-2)  # (R,H,L,n*m)
    # a_end = e_end x0 + k^T (to_end r) (+ anchor_a): the product accumulates into the decayed start
    a_end = _plus_product(_decayed_start(cur_a, anchor_a, e_end), k.transpose(-1, -2),
                          r if single else to_end.unsqueeze(-1) * r)

    # ---- W1 (B): a gated delta rule per memory with keys h_t (DGD at the current weights, see docs/design.md):
    # Y_t = (alpha_t I - eta1_t h_t^T h_t) Y_{t-1} + eta1_t h_t^T w_t, Y = B - anchor, w_t = vhat_t - k_t - h_t anchor;
    # w_t - h_t Y_{t-1} is minus the error at the current weights. In chunk form (UT transform, as for W2):
    # (I + lower1) u1 = eta1 (h Y_s - e - gamma_{t-1} h Y_0), since vhat - k - h anchor = h Y_s - e.
    hn = h.transpose(2, 3)  # (R,H,n,L,m): per memory, the keys of its delta rule
    e1 = eta1.transpose(2, 3)  # (R,H,n,L)
    h_y0 = hn @ cur_b
    if anchor_b is not None:
        h_anchor = _per_memory(hn, anchor_b)
        h_y0 = h_y0 - h_anchor
    h_ys = h_y0 if same else hn @ snap_b - (0 if anchor_b is None else h_anchor)
    e_t = e.transpose(2, 3)  # (R,H,n,L,d)
    hh = ut1 = None
    if single:
        u1 = e1.unsqueeze(-1) * (h_ys - e_t - h_y0)
    else:
        rhs1 = e1.unsqueeze(-1) * (h_ys - e_t - e_prev[:, :, None, :, None] * h_y0)
        hh = hn @ hn.transpose(-1, -2)  # (R,H,n,L,L)
        lower1 = e1.unsqueeze(-1) * decay.unsqueeze(2) * hh
        eye1 = torch.eye(length, dtype=lower1.dtype, device=lower1.device).expand_as(lower1)
        ut1 = torch.linalg.solve_triangular(lower1, eye1, upper=False, unitriangular=True)
        u1 = ut1 @ rhs1
    b_end = _plus_product(_decayed_start(cur_b, anchor_b, e_end), hn.transpose(-1, -2),
                          u1 if single else to_end[:, :, None, :, None] * u1)

    # ---- read the output memory at the per-token state (Eq. 86, read before write); x0 and y0 (the weights less
    # the anchors) are never formed: their products are those of the weights less those of the anchors
    sl_o = slice((n - 1) * m, n * m)
    q_x0 = q @ cur_a[..., sl_o]
    if spec.retain_toward_init:
        q_anchor = _per_head(q, anchor_a[..., sl_o])
        q_x0 = q_x0 - q_anchor
    if single:
        pre_q = q_x0
    else:
        qk_raw = q @ k.transpose(-1, -2)
        qk = qk_raw * decay
        pre_q = e_prev.unsqueeze(-1) * q_x0 + qk @ r[..., sl_o]
    if spec.retain_toward_init:
        pre_q = pre_q + q_anchor
    s0 = F.silu(pre_q)  # (R,H,L,m)
    s = l2norm(s0) if spec.feature_norm else s0
    s_y0 = s @ cur_b[:, :, -1]
    if spec.retain_toward_init:
        s_anchor = _per_head(s, anchor_b[:, -1])
        s_y0 = s_y0 - s_anchor
    if single:
        o = q + s_y0
    else:
        sh_raw = s @ hn[:, :, -1].transpose(-1, -2)
        sh = sh_raw * decay
        o = q + e_prev.unsqueeze(-1) * s_y0 + sh @ u1[:, :, -1]
    if spec.retain_toward_init:
        o = o + s_anchor
    if not keep:
        return o, a_end, b_end
    # everything chunk_backward reads (the weights it needs are among the inputs)
    saved = dict(eta=eta, z=z, sig_all=sig_all, raw_all=raw_all, nrm_all=nrm_all, h_all=h_all, h_e=h_e, pre=pre,
                 sig=sig, raw=raw, h=h, e=e, dpre0=dpre0, dpre=dpre, s0=s0,
                 b_e=b_e, delta=delta, h_sq=h_sq, eta1=eta1, col_norms=col_norms, dpre_sq=dpre_sq, curv=curv, eta2=eta2,
                 decay=decay, to_end=to_end, e_prev=e_prev, e_end=e_end, eta_p=eta_p, k_anchor=k_anchor, k_x0=k_x0,
                 kk=kk, ut=ut, r=r, hh=hh, ut1=ut1, u1=u1, h_y0=h_y0, h_ys=h_ys, qk_raw=qk_raw, qk=qk, q_x0=q_x0, pre_q=pre_q, s=s,
                 sh_raw=sh_raw, sh=sh, s_y0=s_y0)
    return o, a_end, b_end, saved


def mlp_chunk_backward(spec: ChunkSpec, inputs, t, d_o, d_a_end, d_b_end):
    """The vector-Jacobian product of `mlp_chunk_forward`, written out (same numbers as autograd through it, tested).

    `inputs` are the forward's tensors, `t` its intermediates (`keep=True`), `d_*` the gradients of its outputs.
    Returns the gradients of (q, k, v, eta, log_alpha, snap_a, snap_b, cur_a, cur_b, anchor_a, anchor_b); the
    anchors' (H-shaped, shared by the batch rows) are summed over the rows. A snapshot given as None (the current
    weights) gets None: its gradient is in the current weights'.
    """
    q, k, v, eta_in, log_alpha_in, write, snap_a, snap_b, cur_a, cur_b, anchor_a, anchor_b = inputs
    same, snap_a, snap_b = _snapshot_weights(snap_a, snap_b, cur_a, cur_b)
    C, n, m = spec.chunk_size, spec.num_memories, spec.memory_dim
    length = q.shape[2]
    retain = spec.retain_toward_init
    sl_o = slice((n - 1) * m, n * m)
    eta, h, e, decay, eta1, s, r = t["eta"], t["h"], t["e"], t["decay"], t["eta1"], t["s"], t["r"]
    e_prev, e_end, to_end = t["e_prev"], t["e_end"], t["to_end"]
    tr = lambda x: x.transpose(-1, -2)  # noqa: E731
    # Every use of a (t, i) matrix below is multiplied by `decay`, zero for i >= t: no causal mask is needed.
    # d_log_decay: the gradient of the exponent of decay, i.e. of decay times decay.

    # As in the forward, x0 = cur_a - anchor_a and y0 = cur_b - anchor_b are never formed: a product with one is
    # the product with the weights less the product with the anchors, which joins the anchors' own term.

    # ---- the output read: o = q + e_prev * (s @ y0_o) + sh @ u1_o (+ s @ anchor_b_o); "_o": the output memory's
    # slices, added into the full gradients further down
    u1, hn = t["u1"], h.transpose(2, 3)
    d_q = d_o.clone()
    d_o_prev = e_prev.unsqueeze(-1) * d_o
    d_s = d_o_prev @ tr(cur_b[:, :, -1])
    d_y0_o = tr(s) @ d_o_prev
    d_g_prev = (d_o * t["s_y0"]).sum(-1) * e_prev
    if retain:
        d_s = d_s + _per_head(d_o - d_o_prev, tr(anchor_b[:, -1]))
        d_anchor_b_o = (tr(s) @ d_o).sum(0)
    d_u1_o = tr(t["sh"]) @ d_o
    d_sh_raw = (d_o @ tr(u1[:, :, -1])) * decay
    d_log_decay = d_sh_raw * t["sh_raw"]
    d_s = d_s + d_sh_raw @ hn[:, :, -1]
    d_h_o = tr(d_sh_raw) @ s
    sig_q, s0 = torch.sigmoid(t["pre_q"]), t["s0"]
    if spec.feature_norm:  # s = l2norm(silu(pre_q))
        d_s = _l2norm_backward(s, s0, d_s)
    d_pre_q = d_s * torch.addcmul(sig_q, s0, 1 - sig_q)  # silu'
    # pre_q = e_prev * (q @ x0_o) + qk @ r_o (+ q @ anchor_a_o)
    d_pre_q_prev = e_prev.unsqueeze(-1) * d_pre_q
    d_q = d_q + d_pre_q_prev @ tr(cur_a[..., sl_o])
    d_x0_o = tr(q) @ d_pre_q_prev
    d_g_prev = d_g_prev + (d_pre_q * t["q_x0"]).sum(-1) * e_prev
    d_r_o = tr(t["qk"]) @ d_pre_q
    d_qk = d_pre_q @ tr(r[..., sl_o])
    if retain:
        d_q = d_q + _per_head(d_pre_q - d_pre_q_prev, tr(anchor_a[..., sl_o]))
        d_anchor_a_o = (tr(q) @ d_pre_q).sum(0)
    d_qk_raw = d_qk * decay
    d_log_decay = d_log_decay + d_qk_raw * t["qk_raw"]
    d_q = d_q + d_qk_raw @ k
    d_k = tr(d_qk_raw) @ q

    # ---- W1: b_end = e_end * y0 + hn^T (to_end * u1) (+ anchor_b), u1 from the memories' UT transforms
    d_y0, dot_b = _start_gradient(d_b_end, cur_b, anchor_b, e_end)
    d_y0[:, :, -1].add_(d_y0_o)
    d_g_end = dot_b.unsqueeze(-1) * e_end
    te = to_end[:, :, None, :, None]
    d_weighted_u1 = hn @ d_b_end  # (R,H,n,L,d)
    d_hn = (te * u1) @ tr(d_b_end)
    d_u1 = te * d_weighted_u1
    d_u1[:, :, -1].add_(d_u1_o)
    d_to_end = (d_weighted_u1 * u1).sum((2, 4))
    e1 = eta1.transpose(2, 3)
    d_rhs1 = tr(t["ut1"]) @ d_u1  # (I + lower1)^-T d_u1
    neg_d_lower1 = (d_rhs1 @ tr(u1)) * decay.unsqueeze(2)  # strictly lower (the factor decay sees to it)
    hh = t["hh"]
    d_e1 = -(neg_d_lower1 * hh).sum(-1)
    neg_d_hh = neg_d_lower1 * e1.unsqueeze(-1)
    d_log_decay = d_log_decay - (neg_d_hh * hh).sum(2)
    d_hn = d_hn - (neg_d_hh + tr(neg_d_hh)) @ hn
    # rhs1 = e1 * w, w = h_ys - e^T - e_prev * h_y0 (h_ys: h @ (snapshot less anchor); h_y0: h @ (current less anchor))
    h_y0, h_ys = t["h_y0"], t["h_ys"]
    d_w = e1.unsqueeze(-1) * d_rhs1
    d_e1 = d_e1 + (d_rhs1 * (h_ys - e.transpose(2, 3) - e_prev[:, :, None, :, None] * h_y0)).sum(-1)
    d_e = d_w.transpose(2, 3).neg()  # (R,H,L,n,d)
    d_g_prev = d_g_prev - (d_w * h_y0).sum((2, 4)) * e_prev
    d_h_y0 = -e_prev[:, :, None, :, None] * d_w
    d_h_ys = d_w
    if same:
        d_h_y0 = d_h_y0 + d_h_ys
    d_hn = d_hn + d_h_y0 @ tr(cur_b)
    d_y0 = _plus_product(d_y0, tr(hn), d_h_y0)
    d_snap_b_w1 = None
    if not same:
        d_hn = d_hn + d_h_ys @ tr(snap_b)
        d_snap_b_w1 = tr(hn) @ d_h_ys
    d_cur_b = d_y0
    d_anchor_a = d_anchor_b = None
    if retain:
        # h_y0 = h (cur_b - anchor_b), h_ys = h (snap_b - anchor_b): the anchor's share of h's gradient, and of
        # the anchor's own through y0 (d_y0 holds h_y0's) and through h_ys
        d_hn = d_hn - _per_memory(d_h_y0 if same else d_h_y0 + d_h_ys, tr(anchor_b))
        d_anchor_b = d_b_end.sum(0) - d_y0.sum(0)
        if not same:
            d_anchor_b = d_anchor_b - d_snap_b_w1.sum(0)
        d_anchor_b[:, -1].add_(d_anchor_b_o)
    d_h = d_hn.transpose(2, 3)  # (R,H,L,n,m)
    d_h[..., -1, :].add_(d_h_o)
    d_eta1 = d_e1.transpose(2, 3)  # (R,H,L,n)

    # ---- W2: a_end = e_end * x0 + k^T (to_end * r) (+ anchor_a), r from the UT transform
    d_x0, dot_a = _start_gradient(d_a_end, cur_a, anchor_a, e_end)
    d_x0[..., sl_o].add_(d_x0_o)
    d_g_end = d_g_end + dot_a.unsqueeze(-1) * e_end
    weighted_r = to_end.unsqueeze(-1) * r
    d_k = d_k + weighted_r @ tr(d_a_end)
    d_weighted_r = k @ d_a_end
    d_r = to_end.unsqueeze(-1) * d_weighted_r
    d_r[..., sl_o].add_(d_r_o)
    d_to_end = d_to_end + (d_weighted_r * r).sum(-1)
    if retain:
        d_anchor_a = d_a_end.sum(0)
        d_anchor_a[..., sl_o].add_(d_anchor_a_o)
    d_r = d_r.unflatten(-1, (n, m))  # per memory: (R,H,L,n,m)
    if spec.dgd:
        eta_p, k_x0, kk = t["eta_p"], t["k_x0"], t["kk"]
        r_n = r.unflatten(-1, (n, m)).transpose(2, 3)  # (R,H,n,L,m)
        d_rhs = tr(t["ut"]) @ d_r.transpose(2, 3)  # (I + lower)^-T d_r, per memory
        # lower = eta_p * decay * kk; its gradient is -(d_rhs r^T), strictly lower (the factor decay sees to it)
        neg_d_lower = (d_rhs @ tr(r_n)) * decay.unsqueeze(2)  # (R,H,n,L,L)
        d_eta_p = -(neg_d_lower * kk.unsqueeze(2)).sum(-1).transpose(2, 3)  # (R,H,L,n)
        neg_d_kk = (neg_d_lower * eta_p.transpose(2, 3).unsqueeze(-1)).sum(2)
        d_log_decay = d_log_decay - neg_d_kk * kk
        d_k = d_k - (neg_d_kk + tr(neg_d_kk)) @ k
        d_force = d_rhs.transpose(2, 3)  # (R,H,L,n,m)
        coef = eta_p * e_prev.unsqueeze(-1)
        d_coef = -(d_force * k_x0).sum(-1)
        d_eta_p = d_eta_p + d_coef * e_prev.unsqueeze(-1)
        d_g_prev = d_g_prev + (d_coef * coef).sum(-1)
        d_k_x0 = -coef.unsqueeze(-1) * d_force
        if not same:  # (else k @ cur_a is in the snapshot's product, whose gradients come below)
            d_k = d_k + d_k_x0.flatten(-2) @ tr(cur_a)
            d_x0 = _plus_product(d_x0, tr(k), d_k_x0.flatten(-2))
        if retain:
            d_k_anchor = -eta_p.unsqueeze(-1) * d_force
            d_k = d_k + _per_head((d_k_anchor - d_k_x0).flatten(-2), tr(anchor_a))
            # the anchor's share of k @ x0: through d_x0 below, or here where d_x0 has not got it
            d_anchor_a = d_anchor_a + (tr(k) @ (d_k_anchor - d_k_x0 if same else d_k_anchor).flatten(-2)).sum(0)
            d_eta_p = d_eta_p - (d_force * t["k_anchor"]).sum(-1)
        # eta_p = eta / (1 + eta |k|^2)
        k_sq = k.pow(2).sum(-1, keepdim=True)
        den = (1 + eta * k_sq).pow(2)
        d_eta = d_eta_p / den
        d_k = d_k - (2 * d_eta_p * eta.pow(2) / den).sum(-1, keepdim=True) * k
    else:
        d_force = d_r
        d_eta = torch.zeros_like(eta)
    d_delta = -t["eta2"].unsqueeze(-1) * d_force
    d_eta2 = -(d_force * t["delta"]).sum(-1)
    d_cur_a = d_x0
    if retain:
        d_anchor_a = d_anchor_a - d_x0.sum(0)

    # ---- decays: decay[t, i] = exp(g_prev_t - g_i) (i < t), to_end = exp(g_end - g), g = cumsum(log_alpha)
    d_g_prev = d_g_prev + d_log_decay.sum(-1)
    d_g = -d_log_decay.sum(-2)
    d_to_end = d_to_end * to_end
    d_g_end = d_g_end + d_to_end.sum(-1, keepdim=True)
    d_g = d_g - d_to_end
    d_g[..., -1:].add_(d_g_end)
    d_g = d_g + d_g_prev
    d_log_alpha = d_g.flip(-1).cumsum(-1).flip(-1) - d_g_prev

    # ---- step sizes (per memory): eta1 = eta / (1 + eta |h|^2), eta2 = eta / (1 + C eta curv)
    den1 = (1 + eta * t["h_sq"]).pow(2)
    d_eta = d_eta + d_eta1 / den1
    d_h = d_h + (-2 * d_eta1 * eta.pow(2) / den1).unsqueeze(-1) * h
    den2 = (1 + C * eta * t["curv"]).pow(2)
    d_eta = d_eta + d_eta2 / den2
    d_curv = -C * d_eta2 * eta.pow(2) / den2
    dpre = t["dpre"]
    d_dpre = (2 * d_curv).unsqueeze(-1) * dpre * t["col_norms"].unsqueeze(2)
    d_col = (d_curv.unsqueeze(-1) * t["dpre_sq"]).sum(2)
    # the snapshot's gradients accumulate into the current weights' where it is them (after the anchors took theirs)
    if same:
        d_snap_b = d_cur_b.addcmul_(snap_b, (2 * d_col).unsqueeze(-1))
    else:
        d_snap_b = d_snap_b_w1.addcmul_(snap_b, (2 * d_col).unsqueeze(-1))

    # ---- gradients at the snapshot: delta = (e B^T) * dpre, e = M(k) - vhat; with normalised features
    # delta = (b_e - h <h, b_e>) * silu'(pre) * nrm, nrm = 1 / |silu(pre)|
    b_e = t["b_e"]
    d_nrm = None
    if spec.feature_norm:
        h_b_e = (h * b_e).sum(-1, keepdim=True)
        d_proj = d_delta * dpre
        d_dpre = d_dpre + d_delta * (b_e - h * h_b_e)
        h_d_proj = (h * d_proj).sum(-1, keepdim=True)
        d_b_e = d_proj - h * h_d_proj
        d_h = d_h - d_proj * h_b_e - b_e * h_d_proj
        d_nrm = (d_dpre * t["dpre0"]).sum(-1, keepdim=True)  # dpre = silu'(pre) * nrm
        d_dpre = d_dpre * t["nrm_all"][:, :, t["nrm_all"].shape[2] - length :]
    else:
        d_b_e = d_delta * dpre
        d_dpre = d_dpre + d_delta * b_e
    d_e = d_e + torch.einsum("rhcnm,rhnmd->rhcnd", d_b_e, snap_b)
    sig, pre = t["sig"], t["pre"]
    silu_grad2 = sig * (1 - sig) * (2 + pre - 2 * t["raw"])  # silu''(pre) = sig (1 - sig) (2 + pre (1 - 2 sig))

    # ---- the reads through the snapshot: e = (k - v) + (silu(k A) - silu(v A)) B (v's read absent without
    # self-modification, and gradient-free with detached targets)
    z, sig_all, raw_all = t["z"], t["sig_all"], t["raw_all"]
    # d_snap_b: the column norms' term + d_b_e^T e + h_e^T d_e, the two products as one over 2L tokens
    d_snap_b = _plus_product(d_snap_b, _tokens_last(torch.cat([d_b_e, t["h_e"]], dim=2)),
                             torch.cat([e, d_e], dim=2).transpose(2, 3))
    d_h_e = torch.einsum("rhcnd,rhnmd->rhcnm", d_e, snap_b)
    d_e_sum = d_e.sum(-2)
    if not spec.self_modifying:
        d_h_all = d_h_e
    elif spec.detach_self_targets:
        d_h_all = torch.cat([torch.zeros_like(d_h_e), d_h_e], dim=2)
    else:  # the v rows: minus the share of the memories with self-generated targets (all but the output memory)
        d_h_all = torch.cat([torch.cat([-d_h_e[..., :-1, :], torch.zeros_like(d_h_e[..., -1:, :])], -2), d_h_e], 2)
    keys = slice(d_h_all.shape[2] - length, None)  # the keys' rows (after v's where there are two sets)
    d_h_all[:, :, keys].add_(d_h)
    if spec.feature_norm:  # h = silu(pre) * nrm, nrm = (|silu(pre)|^2 + eps)^-1/2
        nrm_all = t["nrm_all"]
        dot = (d_h_all * raw_all).sum(-1, keepdim=True)
        dot[:, :, keys].add_(d_nrm)
        d_raw_all = d_h_all * nrm_all - raw_all * nrm_all.pow(3) * dot
    else:
        d_raw_all = d_h_all
    d_pre_all = d_raw_all * torch.addcmul(sig_all, raw_all, 1 - sig_all)  # silu'
    d_pre_all[:, :, keys].addcmul_(d_dpre, silu_grad2)
    if same and spec.dgd:  # k_x0 = (the keys' rows of pre_all) - k_anchor
        d_pre_all[:, :, keys].add_(d_k_x0)
    d_pre_all = d_pre_all.flatten(-2)
    d_z = d_pre_all @ tr(snap_a)
    d_snap_a = _plus_product(d_cur_a, tr(z), d_pre_all) if same else tr(z) @ d_pre_all
    d_k = d_k + d_e_sum + d_z[:, :, d_z.shape[2] - length :]
    if not spec.self_modifying:
        d_v = -d_e_sum
    elif spec.detach_self_targets:
        d_v = torch.zeros_like(v)  # the targets M(v) are constants, and v reaches e through them alone
    else:
        d_v = d_z[:, :, :length] - d_e_sum
    if same:
        d_snap_a = d_snap_b = None
    return (d_q, d_k, d_v, d_eta * write.unsqueeze(-1), d_log_alpha * write, d_snap_a, d_snap_b, d_cur_a, d_cur_b,
            d_anchor_a, d_anchor_b)


def _decays(log_alpha, length):
    """Per-chunk decays in log space: (decay, to_end, e_prev, e_end) with decay[t, i] = gamma_{t-1} / gamma_i for
    i < t (0 elsewhere), to_end = gamma_L / gamma_i, e_prev = gamma_{t-1}, e_end = gamma_L, gamma_t = prod alpha."""
    g = torch.cumsum(log_alpha, dim=-1)
    g_prev = g - log_alpha
    causal = torch.ones(length, length, dtype=torch.bool, device=log_alpha.device).tril(-1)
    decay = torch.exp((g_prev.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(~causal, -math.inf))
    g_end = g[..., -1:]
    return decay, torch.exp(g_end - g), torch.exp(g_prev), torch.exp(g_end)


def _decays_backward(log_alpha, to_end, d_log_decay, d_to_end, d_g_prev, d_g_end):
    """The gradient of log_alpha from those of the exponent of `decay` (d_log_decay = d_decay * decay), of to_end,
    of g_prev = log(e_prev) and of g_end = log(e_end)."""
    d_g_prev = d_g_prev + d_log_decay.sum(-1)
    d_g = -d_log_decay.sum(-2)
    d_to_end = d_to_end * to_end
    d_g_end = d_g_end + d_to_end.sum(-1, keepdim=True)
    d_g = d_g - d_to_end
    d_g[..., -1:].add_(d_g_end)
    d_g = d_g + d_g_prev
    return d_g.flip(-1).cumsum(-1).flip(-1) - d_g_prev


def _error_inputs(spec: ChunkSpec, k, v, n: int):
    """What each linear memory's B multiplies in its error M_s(k) - vhat: k - v where the target is self-generated
    (vhat = M_s(v)), k for the output memory (vhat = v) and without self-modification: (R, H, n or 1, L, d)."""
    if not spec.self_modifying:
        return k.unsqueeze(2)
    return torch.cat([(k - v).unsqueeze(2).expand(-1, -1, n - 1, -1, -1), k.unsqueeze(2)], dim=2)


def linear_chunk_forward(spec: ChunkSpec, q, k, v, eta, log_alpha, write, snap_a, snap_b, cur_a, cur_b, anchor_a,
                         anchor_b, keep: bool = False):
    """One chunk of the linear memories (`memory_depth=1`: M(z) = z + z B, B (d x d) per memory), exactly: every
    memory is a gated delta rule with the keys k (DGD at the current weights, paper Eq. 57 and 93 with the
    sign-corrected value term). Same signature and returns as `chunk_forward`; the first-layer weights A are empty
    (R, H, d, 0) and pass through unchanged.

    Per token and memory, in deviations Y = B - anchor: Y_t = (alpha_t I - eta'_t k_t^T k_t) Y_{t-1}
    + eta'_t k_t^T (vhat_t - k_t - k_t anchor), eta' = eta / (1 + eta |k|^2); in chunk form one UT transform per
    chunk and head serves every memory. Reads of the output memory at the per-token state (read before write).
    """
    same = snap_b is None
    snap_b = cur_b if same else snap_b
    length = q.shape[2]
    eta = eta * write.unsqueeze(-1)
    log_alpha = log_alpha * write
    # M_s(k) - vhat per memory: (R,H,n,L,d); vhat = M_s(v) (self-generated) for all but the output memory, whose
    # target is v itself
    e = (k - v).unsqueeze(2) + _error_inputs(spec, k, v, snap_b.shape[2]) @ snap_b
    if spec.self_modifying and spec.detach_self_targets:  # same values; the gradient reaches e through M(k) only
        mk = k.unsqueeze(2) + k.unsqueeze(2) @ snap_b
        e = e.detach() + (mk - mk.detach())
    eta1 = (eta / (1 + eta * k.pow(2).sum(-1, keepdim=True))).transpose(2, 3)  # per memory: (R,H,n,L)
    decay, to_end, e_prev, e_end = _decays(log_alpha, length)
    k_y0 = k.unsqueeze(2) @ cur_b
    q_y0 = q.unsqueeze(2) @ cur_b[:, :, -1:]
    if anchor_b is not None:
        k_anchor = _per_memory(k.unsqueeze(2).expand(-1, -1, anchor_b.shape[1], -1, -1), anchor_b)
        k_y0 = k_y0 - k_anchor
        q_anchor = _per_head(q, anchor_b[:, -1])
        q_y0 = q_y0 - q_anchor.unsqueeze(2)
    k_ys = k_y0 if same else k.unsqueeze(2) @ snap_b - (0 if anchor_b is None else k_anchor)
    rhs = eta1.unsqueeze(-1) * (k_ys - e - e_prev[:, :, None, :, None] * k_y0)
    kk = k @ k.transpose(-1, -2)
    lower = eta1.unsqueeze(-1) * (decay * kk).unsqueeze(2)  # (R,H,n,L,L)
    eye = torch.eye(length, dtype=lower.dtype, device=lower.device).expand_as(lower)
    ut = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
    u1 = ut @ rhs  # (R,H,n,L,d)
    b_end = _plus_product(_decayed_start(cur_b, anchor_b, e_end), k.transpose(-1, -2).unsqueeze(2).expand(
        -1, -1, cur_b.shape[2], -1, -1), to_end[:, :, None, :, None] * u1)
    qk = (q @ k.transpose(-1, -2)) * decay
    o = q + e_prev.unsqueeze(-1) * q_y0[:, :, 0] + qk @ u1[:, :, -1]
    if anchor_b is not None:
        o = o + q_anchor
    if not keep:
        return o, cur_a, b_end
    saved = dict(eta=eta, e=e, eta1=eta1, decay=decay, to_end=to_end, e_prev=e_prev, e_end=e_end, k_y0=k_y0,
                 k_ys=k_ys, q_y0=q_y0, kk=kk, ut=ut, u1=u1, qk=qk)
    return o, cur_a, b_end, saved


def linear_chunk_backward(spec: ChunkSpec, inputs, t, d_o, d_a_end, d_b_end):
    """The vector-Jacobian product of `linear_chunk_forward`, written out (tested against autograd); returns the
    gradients in `chunk_backward`'s order."""
    q, k, v, eta_in, log_alpha_in, write, snap_a, snap_b, cur_a, cur_b, anchor_a, anchor_b = inputs
    same = snap_b is None
    snap_b = cur_b if same else snap_b
    tr = lambda x: x.transpose(-1, -2)  # noqa: E731
    eta, e, eta1, decay, to_end, e_prev, e_end = (t[n] for n in ("eta", "e", "eta1", "decay", "to_end", "e_prev",
                                                                 "e_end"))
    u1, k_y0, k_ys, kk = t["u1"], t["k_y0"], t["k_ys"], t["kk"]
    ep = e_prev[:, :, None, :, None]
    # ---- the read: o = q + e_prev * (q @ y0_o) + qk @ u1_o (+ q @ anchor_o), qk = (q k^T) * decay
    d_q = d_o.clone()
    d_o_prev = e_prev.unsqueeze(-1) * d_o
    d_q = d_q + d_o_prev @ tr(cur_b[:, :, -1])
    d_y0 = torch.zeros_like(cur_b)
    d_y0[:, :, -1] = tr(q) @ d_o_prev
    d_g_prev = (d_o * t["q_y0"][:, :, 0]).sum(-1) * e_prev
    d_u1 = torch.zeros_like(u1)
    d_u1[:, :, -1] = tr(t["qk"]) @ d_o
    d_qk_raw = (d_o @ tr(u1[:, :, -1])) * decay
    d_log_decay = d_qk_raw * (q @ tr(k))
    d_q = d_q + d_qk_raw @ k
    d_k = tr(d_qk_raw) @ q
    d_anchor_b = None
    if anchor_b is not None:
        d_q = d_q + _per_head(d_o - d_o_prev, tr(anchor_b[:, -1]))
        d_anchor_b = torch.zeros_like(anchor_b)
        d_anchor_b[:, -1] = (tr(q) @ d_o).sum(0)
    # ---- B: b_end = e_end * y0 + k^T (to_end * u1) (+ anchor)
    d_start, dot_b = _start_gradient(d_b_end, cur_b, anchor_b, e_end)
    d_y0 = d_y0 + d_start
    d_g_end = dot_b.unsqueeze(-1) * e_end
    d_weighted = k.unsqueeze(2) @ d_b_end  # (R,H,n,L,d)
    d_k = d_k + ((to_end[:, :, None, :, None] * u1) @ tr(d_b_end)).sum(2)
    d_u1 = d_u1 + to_end[:, :, None, :, None] * d_weighted
    d_to_end = (d_weighted * u1).sum((2, 4))
    d_rhs = tr(t["ut"]) @ d_u1
    neg_d_lower = (d_rhs @ tr(u1)) * decay.unsqueeze(2)  # (R,H,n,L,L)
    d_eta1 = -(neg_d_lower * kk.unsqueeze(2)).sum(-1)  # (R,H,n,L)
    neg_d_kk = (neg_d_lower * eta1.unsqueeze(-1)).sum(2)
    d_log_decay = d_log_decay - neg_d_kk * kk
    d_k = d_k - (neg_d_kk + tr(neg_d_kk)) @ k
    # rhs = eta1 * w, w = k_ys - e - e_prev * k_y0
    w = k_ys - e - ep * k_y0
    d_eta1 = d_eta1 + (d_rhs * w).sum(-1)
    d_w = eta1.unsqueeze(-1) * d_rhs
    d_e = -d_w
    d_g_prev = d_g_prev - (d_w * k_y0).sum((2, 4)) * e_prev
    d_k_y0 = -ep * d_w
    d_k_ys = d_w
    if same:
        d_k_y0 = d_k_y0 + d_k_ys
    d_k = d_k + (d_k_y0 @ tr(cur_b)).sum(2)
    d_y0 = d_y0 + tr(k).unsqueeze(2) @ d_k_y0
    d_snap_b = None
    if not same:
        d_k = d_k + (d_k_ys @ tr(snap_b)).sum(2)
        d_snap_b = tr(k).unsqueeze(2) @ d_k_ys
    if anchor_b is not None:
        d_anchor = d_k_y0 if same else d_k_y0 + d_k_ys
        d_k = d_k - _per_memory(d_anchor, tr(anchor_b)).sum(2)
        d_anchor_b = d_anchor_b + d_b_end.sum(0) - d_y0.sum(0)
        if not same:
            d_anchor_b = d_anchor_b - d_snap_b.sum(0)
    # ---- eta1 = eta / (1 + eta |k|^2), per memory
    d_eta1 = d_eta1.transpose(2, 3)  # (R,H,L,n)
    den = (1 + eta * k.pow(2).sum(-1, keepdim=True)).pow(2)
    d_eta = d_eta1 / den
    d_k = d_k - (2 * d_eta1 * eta.pow(2) / den).sum(-1, keepdim=True) * k
    d_log_alpha = _decays_backward(log_alpha_in, to_end, d_log_decay, d_to_end, d_g_prev, d_g_end)
    # ---- e = (k - v) + z_e @ B_s (z_e = k - v for memories with self-generated targets, else k)
    if spec.self_modifying and spec.detach_self_targets:
        d_mk = d_e
        d_k = d_k + d_mk.sum(2) + (d_mk @ tr(snap_b)).sum(2)
        d_v = torch.zeros_like(v)
        d_sb = tr(k).unsqueeze(2) @ d_mk
    else:
        d_z = d_e @ tr(snap_b)
        d_sb = tr(_error_inputs(spec, k, v, snap_b.shape[2])) @ d_e
        d_e_sum = d_e.sum(2)
        d_k = d_k + d_e_sum + d_z.sum(2)
        d_v = -d_e_sum - (d_z[:, :, :-1].sum(2) if spec.self_modifying else 0)
    if same:  # B_s is cur_b itself (not a deviation): the anchor has no share in it
        d_y0 = d_y0 + d_sb
    else:
        d_snap_b = d_snap_b + d_sb
    return (d_q, d_k, d_v, d_eta * write.unsqueeze(-1), d_log_alpha * write, None if same else torch.zeros_like(snap_a),
            d_snap_b, torch.zeros_like(cur_a), d_y0, None if anchor_a is None else torch.zeros_like(anchor_a),
            d_anchor_b)


def chunk_forward(spec: ChunkSpec, *inputs, keep: bool = False):
    """One chunk of the memory rule for all memories and heads: `mlp_chunk_forward` (residual MLP memories,
    `spec.depth` 2) or `linear_chunk_forward` (linear memories, depth 1); see those for the arguments."""
    return (mlp_chunk_forward if spec.depth == 2 else linear_chunk_forward)(spec, *inputs, keep=keep)


def chunk_backward(spec: ChunkSpec, inputs, t, d_o, d_a_end, d_b_end):
    """The written-out backward of `chunk_forward`: `mlp_chunk_backward` or `linear_chunk_backward`."""
    return (mlp_chunk_backward if spec.depth == 2 else linear_chunk_backward)(spec, inputs, t, d_o, d_a_end, d_b_end)


def generated_chunk_forward(spec: ChunkSpec, gen_spec: GenerateSpec, q, u, write, snap_a, snap_b, cur_a, cur_b,
                            anchor_a, anchor_b, *params):
    """A self-modifying chunk: `generate` from the snapshot, then `chunk_forward`, keeping both's intermediates."""
    _, gen_a, gen_b = _snapshot_weights(snap_a, snap_b, cur_a, cur_b)
    k, v, eta, log_alpha, gen_saved = generate(gen_spec, u, gen_a, gen_b, *params, keep=True)
    o, a_end, b_end, saved = chunk_forward(spec, q, k, v, eta, log_alpha, write, snap_a, snap_b, cur_a, cur_b,
                                           anchor_a, anchor_b, keep=True)
    saved.update({"gen_" + name: t for name, t in gen_saved.items()}, gen_eta=eta, gen_log_alpha=log_alpha)
    return o, a_end, b_end, saved


def generated_chunk_backward(spec: ChunkSpec, gen_spec: GenerateSpec, inputs, t, d_o, d_a_end, d_b_end):
    """The backward of `generated_chunk_forward`: `chunk_backward`, then `generate_backward`, whose snapshot
    gradients accumulate into the chunk's. Returns the gradients of its inputs after the specs (None for write)."""
    q, u, write, snap_a, snap_b, cur_a, cur_b, anchor_a, anchor_b, *params = inputs
    chunk_inputs = (q, t["gen_k"], t["gen_v"], t["gen_eta"], t["gen_log_alpha"], write, snap_a, snap_b, cur_a, cur_b,
                    anchor_a, anchor_b)
    d_q, d_k, d_v, d_eta, d_log_alpha, d_snap_a, d_snap_b, d_cur_a, d_cur_b, *rest = chunk_backward(
        spec, chunk_inputs, t, d_o, d_a_end, d_b_end)
    gen_saved = {name[4:]: value for name, value in t.items() if name.startswith("gen_")}
    # a snapshot that is the current weights: their gradients take the generation's
    same, gen_a, gen_b = _snapshot_weights(snap_a, snap_b, cur_a, cur_b)
    d_u, d_params = generate_backward(gen_spec, u, gen_a, gen_b, params, gen_saved, d_k, d_v, d_eta, d_log_alpha,
                                      d_cur_a if same else d_snap_a, d_cur_b if same else d_snap_b)
    return (d_q, d_u, None, d_snap_a, d_snap_b, d_cur_a, d_cur_b, *rest, *d_params)


@functools.cache
def chunk_functions(spec: ChunkSpec, gen_spec: GenerateSpec | None = None):
    """The forward (keeping its intermediates) and backward of `ChunkStep` for `spec`: `chunk_forward` and
    `chunk_backward`, or with `gen_spec` their self-modifying versions (the generation included), compiled by
    `torch.compile` (Inductor, whole graphs) if `spec.compiled`. One pair per spec, shared by every layer with that
    spec, so that equal layers share the compiled code instead of recompiling it."""

    def forward(*inputs):
        if gen_spec is not None:
            return generated_chunk_forward(spec, gen_spec, *inputs)
        return chunk_forward(spec, *inputs, keep=True)

    def backward(inputs, saved, d_o, d_a_end, d_b_end):
        if gen_spec is not None:
            return generated_chunk_backward(spec, gen_spec, inputs, saved, d_o, d_a_end, d_b_end)
        grads = chunk_backward(spec, inputs, saved, d_o, d_a_end, d_b_end)
        return grads[:5] + (None,) + grads[5:]  # none for the write mask

    if not spec.compiled:
        return forward, backward
    forward, backward = torch.compile(forward, fullgraph=True), torch.compile(backward, fullgraph=True)

    def detached(fn):  # one compiled graph whatever the inputs' requires_grad and identities (no autograd inside)
        return lambda *args: fn(*tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, args))

    return detached(forward), detached(backward)


class ChunkStep(torch.autograd.Function):
    """`chunk_forward` with `chunk_backward` as its backward; with a `GenerateSpec`, a self-modifying chunk: the
    keys, values and gates generated from the snapshot inside the step (`generated_chunk_forward`, inputs
    `q, u, write, ...` and the generation's parameters instead of `q, k, v, eta, log_alpha, write, ...`), so that
    the generation's snapshot gradients accumulate into the chunk's. It keeps the chunk's inputs and the
    intermediates that the forward computes anyway (no weight-sized copies), without autograd's graph of ~130 nodes
    per chunk; under `recompute_memory_states` the first pass runs without gradients (nothing kept) and the pass that
    backward repeats keeps them for one segment at a time."""

    @staticmethod
    def forward(ctx, spec, gen_spec, *inputs):
        forward, ctx.chunk_backward = chunk_functions(spec, gen_spec)
        o, a_end, b_end, saved = forward(*inputs)
        ctx.names, ctx.num_inputs = list(saved), len(inputs)
        ctx.save_for_backward(*inputs, *saved.values())
        return o, a_end, b_end

    @staticmethod
    @once_differentiable
    def backward(ctx, d_o, d_a_end, d_b_end):
        tensors = ctx.saved_tensors
        inputs, saved = tensors[: ctx.num_inputs], dict(zip(ctx.names, tensors[ctx.num_inputs :]))
        return (None, None, *ctx.chunk_backward(inputs, saved, d_o, d_a_end, d_b_end))  # none for the specs


# ---------------------------------------------------------------------------------------------------- layout
def _token_conv(x, weight, tail):
    """The causal depthwise convolution of one token per row: x (B, 1, ch), tail (B, K-1, ch) the previous inputs.
    Returns the output (B, 1, ch) and the new tail."""
    seq = torch.cat([tail.to(x.dtype), x], dim=1)  # (B, K, ch)
    y = torch.einsum("bkc,ck->bc", seq, weight.to(x.dtype)[:, 0]).unsqueeze(1)
    return y, seq[:, 1:]


def _real_token_mask(attention_mask, bsz, seq_len, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(bsz, seq_len, dtype=torch.bool, device=device)
    if isinstance(attention_mask, dict):
        raise ValueError("the Titans mixer needs the 2-D padding mask (batch, length), not a dict of 4-D masks")
    if attention_mask.dim() != 2 or attention_mask.shape[0] != bsz or attention_mask.shape[1] < seq_len:
        raise ValueError(
            f"attention_mask must be a 2-D padding mask of shape (batch={bsz}, length>={seq_len}); "
            f"got {tuple(attention_mask.shape)}"
        )
    return attention_mask[:, -seq_len:].to(device) != 0


def _document_starts(position_ids, real) -> torch.Tensor:
    """Real tokens whose position id is 0 start a new document (packed sequences)."""
    if position_ids is None:
        return torch.zeros_like(real)
    if position_ids.dim() == 3:  # (rope sections, B, T) never used here, but be explicit
        position_ids = position_ids[0]
    return real & (position_ids.to(real.device) == 0)


class _Layout:
    """Maps tokens (B, T) to the chunk frame (R, L): one frame row per (batch row, document) piece.

    In the frame, each row's real tokens are contiguous and its first token sits at the row's chunk position, so
    chunk boundaries fall where they would if that piece were fed alone: padding never shifts them, and a new
    document starts at position 0 of a fresh state. Positions that hold no token are no-ops (no write, no decay).
    When nothing needs moving (no padding, one piece per row, equal chunk positions) the frame is the input itself.
    """

    def __init__(self, real, starts, chunk_pos, chunk_size, kernel_size):
        bsz, seq_len = real.shape
        device = real.device
        self.bsz, self.seq_len, self.C, self.K = bsz, seq_len, chunk_size, kernel_size
        seg = torch.cumsum(starts.long(), dim=1)  # piece index inside the row; 0 continues the given state
        row_offset = torch.where(starts[:, 0], torch.zeros_like(chunk_pos), chunk_pos)
        self.trivial = (
            bool(real.all()) and not bool(starts[:, 1:].any()) and bool((row_offset == row_offset[0]).all())
        )
        if self.trivial:
            self.num_rows = bsz
            self.continues = ~starts[:, 0]  # (R,) does the frame row continue the given state?
            self.src_row = torch.arange(bsz, device=device)
            self.offset = row_offset
            self.length = torch.full((bsz,), seq_len, dtype=torch.long, device=device)
            self.pad_front = int(row_offset[0])
        else:
            key = torch.arange(bsz, device=device).unsqueeze(1) * (seq_len + 1) + seg
            tok_b, tok_t = real.nonzero(as_tuple=True)
            keys = key[tok_b, tok_t]
            uniq, row_of_tok = torch.unique(keys, return_inverse=True)
            self.num_rows = max(int(uniq.numel()), 1)
            if uniq.numel() == 0:  # no real token at all: one dummy frame row
                uniq = torch.zeros(1, dtype=torch.long, device=device)
            # rank of each real token inside its piece
            counts = torch.zeros(self.num_rows, dtype=torch.long, device=device).index_add_(
                0, row_of_tok, torch.ones_like(row_of_tok)
            )
            first = torch.cumsum(counts, 0) - counts
            rank = torch.arange(row_of_tok.numel(), device=device) - first[row_of_tok]
            src_row = uniq // (seq_len + 1)
            continues = (uniq % (seq_len + 1)) == 0
            offset = torch.where(continues, chunk_pos[src_row], torch.zeros_like(src_row))
            # each batch row's last piece: the one with its largest key (pieces are in key order here)
            rows = torch.arange(self.num_rows, device=device)
            last_piece = torch.full((bsz,), -1, dtype=torch.long, device=device).scatter_reduce(
                0, src_row[counts > 0], rows[counts > 0], reduce="amax")
            # frame rows ordered by their number of chunks, longest first (stable): the rows that still hold tokens
            # in a chunk are then a prefix of the frame, which the scan computes alone (`rows_with_tokens`)
            order = torch.sort(-(offset + counts), stable=True).indices
            position = torch.empty_like(order).scatter_(0, order, rows)  # frame row of each piece
            self.src_row, self.continues = src_row[order], continues[order]
            self.offset, self.length = offset[order], counts[order]
            self.last_piece = torch.where(last_piece >= 0, position[last_piece.clamp(min=0)], last_piece)
            self.tok_b, self.tok_t, self.tok_row, self.tok_rank = tok_b, tok_t, position[row_of_tok], rank
            self.pad_front = None
        ends = self.offset + self.length
        self.end_pos = ends % chunk_size
        if self.trivial:
            # the frame is the input itself; its first slice completes the chunk already begun at pad_front
            self.frame_len = seq_len
            first = min(seq_len, chunk_size - self.pad_front)
            self.chunk_bounds = [(0, first)] + [
                (lo, min(lo + chunk_size, seq_len)) for lo in range(first, seq_len, chunk_size)
            ]
            self.last_chunk = torch.full((bsz,), len(self.chunk_bounds) - 1, dtype=torch.long, device=device)
        else:
            # up to the last token (the last chunk may be partial, as in a trivial frame): a short padded batch costs
            # its tokens, not a whole chunk, whatever the chunk size
            self.frame_len = max(int(ends.max()), 1)
            self.chunk_bounds = [(lo, min(lo + chunk_size, self.frame_len))
                                 for lo in range(0, self.frame_len, chunk_size)]
            has_tokens = self.length > 0
            self.last_chunk = torch.where(has_tokens, (ends - 1).div(chunk_size, rounding_mode="floor"), -1)
            # rows that hold tokens in each chunk: a prefix of the frame (see above), at least one (no empty step)
            num_chunks = len(self.chunk_bounds)
            chunks_of_row = torch.bincount(self.last_chunk + 1, minlength=num_chunks + 1)  # rows by chunk count
            self._active = (self.num_rows - chunks_of_row.cumsum(0)[:num_chunks]).clamp(min=1).tolist()

    def rows_with_tokens(self, c: int) -> int:
        """How many frame rows hold tokens in chunk c (the first ones; 0 after the frame's last chunk): the rows
        from `rows_with_tokens(c + 1)` to `rows_with_tokens(c)` have their last chunk at c."""
        if c >= len(self.chunk_bounds):
            return 0
        return self.num_rows if self.trivial else self._active[c]

    # -- streams ---------------------------------------------------------------------------------------------
    def causal_conv(self, x, weight, tail):
        """Causal depthwise conv of x (B, T, ch) with the cached tails; returns the frame (R, L, ch) and new tails."""
        K, ch = self.K, x.shape[-1]
        w = weight.to(x.dtype)
        if self.trivial:
            hist = torch.where(self.continues.view(-1, 1, 1), tail.to(x.dtype), torch.zeros_like(tail, dtype=x.dtype))
            seq = torch.cat([hist, x], dim=1)  # (B, K-1+T, ch)
            y = F.conv1d(seq.transpose(1, 2), w, groups=ch).transpose(1, 2)
            new_tail = seq[:, seq.shape[1] - (K - 1) :]
            return y, new_tail
        # compact every piece to the left, with its history in front
        max_len = int(self.length.max())
        hist = tail.to(x.dtype)[self.src_row] * self.continues.view(-1, 1, 1).to(x.dtype)
        body = x.new_zeros(self.num_rows, max_len, ch)
        body[self.tok_row, self.tok_rank] = x[self.tok_b, self.tok_t]
        seq = torch.cat([hist, body], dim=1)
        y = F.conv1d(seq.transpose(1, 2), w, groups=ch).transpose(1, 2)  # (R, max_len, ch)
        idx = self.length.view(-1, 1) + torch.arange(K - 1, device=x.device).view(1, -1)  # last K-1 of each piece
        piece_tail = seq.gather(1, idx.unsqueeze(-1).expand(-1, -1, ch))
        frame = x.new_zeros(self.num_rows, self.frame_len, ch)
        frame[self.tok_row, self.offset[self.tok_row] + self.tok_rank] = y[self.tok_row, self.tok_rank]
        new_tail = tail.to(x.dtype).clone()
        last_piece = self._last_piece_of_row()
        has = last_piece >= 0
        if bool(has.any()):
            new_tail[has] = piece_tail[last_piece[has]]
        return frame, new_tail

    def frame_write_mask(self, dtype):
        if self.trivial:
            return torch.ones(self.num_rows, 1, self.frame_len, dtype=dtype, device=self.offset.device)
        pos = torch.arange(self.frame_len, device=self.offset.device).view(1, -1)
        mask = (pos >= self.offset.view(-1, 1)) & (pos < (self.offset + self.length).view(-1, 1))
        return mask.to(dtype).unsqueeze(1)  # (R, 1, L)

    def to_tokens(self, frame, seq_len):
        """Frame (R, L, ch) back to tokens (B, T, ch); pad tokens get zeros."""
        if self.trivial:
            return frame
        out = frame.new_zeros(self.bsz, seq_len, frame.shape[-1])
        out[self.tok_b, self.tok_t] = frame[self.tok_row, self.offset[self.tok_row] + self.tok_rank]
        return out

    # -- states ----------------------------------------------------------------------------------------------
    def frame_state(self, state: TitansState, init: TitansState) -> TitansState:
        """Start state of every frame row: the given state for continuing pieces, the initial one otherwise."""
        cont = self.continues

        def pick(given, fresh):
            given = given[self.src_row] if not self.trivial else given
            shape = (-1,) + (1,) * (given.dim() - 1)
            return torch.where(cont.view(shape), given, fresh)

        def pick_pair(given_snapshot, given_current, fresh_snapshot, fresh_current):
            """(snapshot, current); one tensor where both states hold one (a fresh state, a complete chunk)."""
            snapshot = pick(given_snapshot, fresh_snapshot)
            if given_current is given_snapshot and fresh_current is fresh_snapshot:
                return snapshot, snapshot
            return snapshot, pick(given_current, fresh_current)

        snapshot_in, current_in = pick_pair(state.snapshot_in, state.current_in, init.snapshot_in, init.current_in)
        snapshot_out, current_out = pick_pair(state.snapshot_out, state.current_out, init.snapshot_out,
                                              init.current_out)
        return TitansState(
            snapshot_in=snapshot_in,
            snapshot_out=snapshot_out,
            current_in=current_in,
            current_out=current_out,
            chunk_pos=self.offset,
            conv_q=init.conv_q,
            conv_k=init.conv_k,
            conv_v=init.conv_v,
        )

    def _last_piece_of_row(self):
        """Frame row holding each batch row's last piece (-1: the row had no real token)."""
        if self.trivial:
            return torch.arange(self.bsz, device=self.offset.device)
        return self.last_piece

    def row_state(self, state: TitansState, final, tails) -> TitansState:
        """The state of each batch row after its last token (rows without real tokens keep theirs)."""
        snap_a, snap_b, cur_a, cur_b = final
        last = self._last_piece_of_row()
        has = last >= 0
        idx = last.clamp(min=0)

        def pick(new, old):
            new = new[idx]
            shape = (-1,) + (1,) * (new.dim() - 1)
            return torch.where(has.view(shape), new, old)

        return TitansState(
            snapshot_in=pick(snap_a, state.snapshot_in),
            snapshot_out=pick(snap_b, state.snapshot_out),
            current_in=pick(cur_a, state.current_in),
            current_out=pick(cur_b, state.current_out),
            chunk_pos=pick(self.end_pos, state.chunk_pos),
            conv_q=tails[0],
            conv_k=tails[1],
            conv_v=tails[2],
        )
