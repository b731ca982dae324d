"""Self-modifying Titans: the fast-weight memory of HOPE (paper arXiv 2512.24695, Eq. 83-97; docs/design.md §6a).

The layer: its parameters, projections, convolutions and state, and the dispatch to the ops (keys, values and gates
`memory_generate`, the chunk step `memory_chunk`, the scan over chunks `memory_scan`, the chunk frame
`memory_layout`, CUDA graphs `memory_graphs`). The token-by-token reference that the tests compare it with is
`memory_naive.py`.

Notation (row vectors; docs/design.md §6a, "Names"). Per head an MLP memory (`memory_depth=2`) is
`M(z) = z + sigma(z W_in) W_out` with `W_in` (d x m), `W_out` (m x d) and `sigma = l2norm o silu`; a linear memory
(`memory_depth=1`, the default) is `M(z) = z (I + W_out)` with `W_out` (d x d) and no `W_in` (an empty `(d, 0)`
block keeps the state's layout). All memories of a head keep `W_in` side by side, `(d, n*m)`, so every product with
a shared left operand is one matmul, and `W_out` as `(n, m, d)`. `n` is the number of memories (k, v, eta, alpha, o;
fewer with ablations).
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from .memory_chunk import ChunkStep, chunk_forward, fused_chunk_step
from .memory_common import ChunkSpec, GenerateSpec, TitansState, fp32, l2norm
from .memory_generate import generate
from .memory_graphs import GraphedScan, ScanGraphs
from .memory_layout import Layout, document_starts, real_token_mask, token_conv
from .memory_scan import ScanParams, memory_scan


__all__ = ["HopeSelfModifyingTitans", "TitansState", "memory_names", "memory_width"]

# Initial gate biases: alpha = sigmoid(5) ~ 0.993 retains; the output memory's eta = eta_max * sigmoid(0) = eta_max / 2,
# the other memories' eta_max * sigmoid(-4) ~ 0.018 eta_max (docs/design.md, "Initialisation").
ALPHA_BIAS_INIT = 5.0
ETA_BIAS_INIT = 0.0
AUX_ETA_BIAS_INIT = -4.0


def memory_width(config) -> int:
    """Hidden width m of every memory: memory_expansion * head_dim for residual MLPs, head_dim for linear ones
    (their features are the inputs themselves)."""
    return config.memory_expansion * config.head_dim if config.memory_depth == 2 else config.head_dim


def memory_names(config) -> list[str]:
    """Names of the memories a layer holds, in storage order; the output memory "o" is always last."""
    names = []
    if config.self_modifying:
        if config.adaptive_k:
            names.append("k")
        if config.adaptive_v:
            names.append("v")
        names.append("eta")
        if config.retention:
            names.append("alpha")
    names.append("o")
    return names


class _FastInit(nn.Module):
    """Meta-learned initial states and readouts of the memories; kept in float32 (`_keep_in_fp32_modules_strict`)."""

    def __init__(self, config, num_heads: int, head_dim: int, memories: list[str]):
        super().__init__()
        d, m, n = head_dim, memory_width(config), len(memories)
        # float32 also when the model is built in half precision (`from_config(config, dtype=torch.bfloat16)`), as
        # `from_pretrained` keeps them; a float64 build stays float64
        empty = functools.partial(torch.empty, dtype=torch.promote_types(torch.get_default_dtype(), torch.float32))
        if config.memory_depth == 2:
            self.init_in = nn.Parameter(empty(num_heads, d, n * m))  # W_in's initial state, every memory's
        self.init_out = nn.Parameter(empty(num_heads, n, m, d))  # W_out's initial state, every memory's
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
        else:  # linear memories M(z) = z (I + W_out): the identity for k, v, eta, alpha, the zero map for the output
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
        self.memory_names = memory_names(config)
        self.num_memories = len(self.memory_names)
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
        self.fast_init = _FastInit(config, self.num_heads, self.head_dim, self.memory_names)
        self._generate_spec = GenerateSpec(memories=tuple(self.memory_names), memory_dim=self.memory_dim,
                                           eta_max=self.eta_max, retention=config.retention,
                                           depth=config.memory_depth)
        self._scan_graphs = ScanGraphs()

    @property
    def chunk_spec(self) -> "ChunkSpec":
        """The chunk step's settings. `compile_chunk_step` and `memory_kernels` are read from the config at each use
        (like `memory_cuda_graphs`, so that they can be switched on a loaded model); the compiled step applies in
        training mode only: prompts of varying lengths would make inference compile again and again."""
        compiled = self.config.compile_chunk_step and self.training
        kernels = self.config.memory_kernels
        if (self._chunk_spec.compiled, self._chunk_spec.kernels) != (compiled, kernels):
            self._chunk_spec = replace(self._chunk_spec, compiled=compiled, kernels=kernels)
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
    def initial_state(self, batch_size: int, device=None, params: ScanParams | None = None) -> TitansState:
        """The state of a fresh sequence: every memory at its meta-learned initial state (differentiable; from
        `params`, by default `scan_params()`)."""
        p = self.scan_params() if params is None else params
        device = device or p.init_out.device
        if p.init_in is not None:
            init_in = p.init_in.unsqueeze(0).expand(batch_size, *p.init_in.shape)
        else:  # linear memories have no first layer: an empty W_in keeps the state's layout
            init_in = p.init_out.new_zeros(batch_size, self.num_heads, self.head_dim, 0)
        init_out = p.init_out.unsqueeze(0).expand(batch_size, *p.init_out.shape)
        channels = self.num_heads * self.head_dim
        tail = torch.zeros(batch_size, self.kernel_size - 1, channels, device=device, dtype=self.q_proj.weight.dtype)
        return TitansState(
            snapshot_in=init_in,
            snapshot_out=init_out,
            current_in=init_in,
            current_out=init_out,
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
        real = real_token_mask(attention_mask, bsz, seq_len, hidden_states.device)
        starts = document_starts(position_ids, real)
        if seq_len == 1:
            return self._forward_token(hidden_states, real[:, 0], starts[:, 0] if position_ids is not None else None,
                                       state)
        layout = Layout(real, starts, state.chunk_pos, self.chunk_size, self.kernel_size)

        q, conv_q = layout.causal_conv(self.q_proj(hidden_states), self.q_conv.weight, state.conv_q)
        uk, conv_k = layout.causal_conv(self.k_proj(hidden_states), self.k_conv.weight, state.conv_k)
        uv, conv_v = layout.causal_conv(self.v_proj(hidden_states), self.v_conv.weight, state.conv_v)
        q = l2norm(fp32(self._heads(F.silu(q))))  # (R, H, L, d) in the chunk frame
        u = self._streams(uk, uv)

        params = self.scan_params()
        init = self.initial_state(layout.num_rows, hidden_states.device, params)
        start = layout.frame_state(state, init)
        # the fast weights stay in float32 under autocast too: the memory math opts out of it (and so the forward,
        # the written-out backward and its recomputation all see the same dtypes)
        with torch.autocast(device_type=q.device.type, enabled=False):
            o, final = self._scan(q, u, start, layout, fresh, params)
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
        allows it (no gradients, the same batch shape a second time; see `TokenGraph`). Inside `torch.compile`
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
        params = self.scan_params()
        if start is not None:  # a new document: the fresh state, empty convolution history
            init = self.initial_state(bsz, hidden_states.device, params)
            state = TitansState(**{
                name: torch.where(start.view((-1,) + (1,) * (old.dim() - 1)), fresh, old)
                for (name, old), fresh in zip(state.tensors().items(), init.tensors().values())
            })
        q, conv_q = token_conv(self.q_proj(hidden_states), self.q_conv.weight, state.conv_q)
        uk, conv_k = token_conv(self.k_proj(hidden_states), self.k_conv.weight, state.conv_k)
        uv, conv_v = token_conv(self.v_proj(hidden_states), self.v_conv.weight, state.conv_v)
        q = l2norm(fp32(self._heads(F.silu(q))))  # (B, H, 1, d)
        u = self._streams(uk, uv)
        write = real.to(q.dtype).view(bsz, 1, 1)
        snapshot = (state.snapshot_in, state.snapshot_out)
        with torch.autocast(device_type=q.device.type, enabled=False):
            gen = generate(self._generate_spec, u, *(snapshot if self.config.self_modifying else (None, None)),
                           *params.generation())
            inputs = (q, *gen, write, *snapshot, state.current_in, state.current_out,
                      *params.anchors(self.chunk_spec))
            fused = fused_chunk_step(self.chunk_spec, *inputs)
            if fused is not None:
                o, end_in, end_out = fused(self.chunk_spec, None, *inputs)
            elif torch.is_grad_enabled():
                o, end_in, end_out = ChunkStep.apply(self.chunk_spec, None, *inputs)
            else:  # decoding: nothing to keep for a backward
                o, end_in, end_out = chunk_forward(self.chunk_spec, *inputs)
        pos = state.chunk_pos + real.long()
        complete = pos == self.chunk_size  # the chunk is complete: its end is the next snapshot
        keep = (~real).view(-1, 1, 1, 1)
        current_in = torch.where(keep, state.current_in, end_in)
        current_out = torch.where(keep.unsqueeze(-1), state.current_out, end_out)
        new_state = TitansState(
            snapshot_in=torch.where(complete.view(-1, 1, 1, 1), current_in, state.snapshot_in),
            snapshot_out=torch.where(complete.view(-1, 1, 1, 1, 1), current_out, state.snapshot_out),
            current_in=current_in,
            current_out=current_out,
            chunk_pos=torch.where(complete, 0, pos),
            conv_q=torch.where(real.view(-1, 1, 1), conv_q, state.conv_q),
            conv_k=torch.where(real.view(-1, 1, 1), conv_k, state.conv_k),
            conv_v=torch.where(real.view(-1, 1, 1), conv_v, state.conv_v),
        )
        o = o.transpose(1, 2) * write.view(bsz, 1, 1, 1)  # (B, 1, H, d); a pad token reads 0
        return self._output(o, hidden_states), new_state

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        rows, length, _ = x.shape
        return x.view(rows, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _streams(self, uk: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
        """The memories' inputs after their convolutions: u = [u_k, u_v] (R, H, L, 2d) float32, the key stream
        (read by the k, eta and alpha memories) and the value stream (read by the v memory) side by side."""
        return fp32(torch.cat([self._heads(F.silu(uk)), self._heads(F.silu(uv))], dim=-1))

    # ------------------------------------------------------------------------------------------------ memory math
    def scan_params(self, aliases: dict | None = None) -> ScanParams:
        """The parameters that the memory ops read, as float32 tensors (None where the config has none): the ops
        take them as explicit inputs and never read the module. `aliases` maps `id(parameter)` to a tensor read in
        its place (the CUDA graphs' detached aliases)."""

        def read(name):
            p = getattr(self.fast_init, name, None)
            return None if p is None else fp32(aliases.get(id(p), p) if aliases else p)

        return ScanParams(*(read(name) for name in ScanParams._fields))

    def _generate_parameters(self):
        """`generate`'s parameters in its order, float32 (None where the config has none)."""
        return list(self.scan_params().generation())

    # Eager inside a compiled model: the scan is a loop of written-out chunk steps (`ChunkStep`) and recomputed
    # segments. Dynamo crashed recompiling the segments (torch 2.13), and Inductor failed to build a Triton kernel
    # for the unrolled scan's backward on an H200 (torch 2.11, Triton 3.6: "PassManager::run failed").
    @torch.compiler.disable
    def _scan(self, q, u, start: TitansState, layout: "Layout", fresh: bool, params: ScanParams):
        """The memory scan of the frame: replayed from CUDA graphs where `memory_cuda_graphs` allows it (fresh
        sequences without padding or document starts, see `ScanGraph`), eager otherwise (`memory_scan`)."""
        graph = self._scan_graphs.get(self, q, u, layout) if fresh else None
        if graph is not None and graph.inference:
            o, *final = graph.replay(q, u)
            return o, tuple(final)
        if graph is not None:
            trainable = [p for p in self.fast_init.parameters() if p.requires_grad]
            o, *final = GraphedScan.apply(graph, q, u, *trainable)
            return o, tuple(final)
        return memory_scan(self.chunk_spec, self._generate_spec, q, u, layout.frame_write_mask(q.dtype), start, layout,
                           params, self.config.recompute_memory_states)

    def _fresh_scan(self, q, u, layout: "Layout", params: ScanParams | None = None):
        """The scan of fresh sequences (the computation that `ScanGraph` captures, with `params` read from its
        aliases): reads and final state. The start state is made as `forward_with_state` makes it, so that the
        compiled chunk step sees the same layouts."""
        params = self.scan_params() if params is None else params
        init = self.initial_state(layout.num_rows, q.device, params)
        start = layout.frame_state(init, init)
        o, final = memory_scan(self.chunk_spec, self._generate_spec, q, u, layout.frame_write_mask(q.dtype), start,
                               layout, params, self.config.recompute_memory_states)
        return (o, *final)
