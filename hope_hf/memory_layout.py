"""The chunk frame: maps a batch's tokens (with padding, packed documents and cached chunk positions) to rows whose
chunk boundaries fall where they would if each piece were fed alone, and back."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .memory_common import TitansState


def frame_rows(x, lo, hi):
    """Rows lo..hi-1 of x: x itself when that is all of them."""
    return x if lo == 0 and hi == x.shape[0] else x[lo:hi]


def join_rows(parts):
    """The non-empty parts stacked along the rows; a single part is returned as it is (no copy)."""
    parts = [p for p in parts if p.shape[0]]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def token_conv(x, weight, tail):
    """The causal depthwise convolution of one token per row: x (B, 1, ch), tail (B, K-1, ch) the previous inputs.
    Returns the output (B, 1, ch) and the new tail."""
    seq = torch.cat([tail.to(x.dtype), x], dim=1)  # (B, K, ch)
    y = torch.einsum("bkc,ck->bc", seq, weight.to(x.dtype)[:, 0]).unsqueeze(1)
    return y, seq[:, 1:]


def real_token_mask(attention_mask, bsz, seq_len, device) -> torch.Tensor:
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


def document_starts(position_ids, real) -> torch.Tensor:
    """Real tokens whose position id is 0 start a new document (packed sequences)."""
    if position_ids is None:
        return torch.zeros_like(real)
    if position_ids.dim() == 3:  # (rope sections, B, T) never used here, but be explicit
        position_ids = position_ids[0]
    return real & (position_ids.to(real.device) == 0)


class Layout:
    """Maps tokens (B, T) to the chunk frame (R, L): one frame row per (batch row, document) piece.

    In the frame, each row's real tokens are contiguous and its first token sits at the row's chunk position, so
    chunk boundaries fall where they would if that piece were fed alone: padding never shifts them, and a new
    document starts at position 0 of a fresh state. Positions that hold no token are no-ops (no write, no decay).
    When nothing needs moving (no padding, one piece per row, equal chunk positions) the frame is the input itself.
    """

    def __init__(self, real, starts, chunk_pos, chunk_size, kernel_size):
        bsz, seq_len = real.shape
        self.bsz, self.seq_len, self.C, self.K = bsz, seq_len, chunk_size, kernel_size
        row_offset = torch.where(starts[:, 0], torch.zeros_like(chunk_pos), chunk_pos)
        self.trivial = (
            bool(real.all()) and not bool(starts[:, 1:].any()) and bool((row_offset == row_offset[0]).all())
        )
        if self.trivial:
            self._rows_of_the_input(starts, row_offset)
        else:
            self._rows_of_the_pieces(real, starts, chunk_pos)
        ends = self.offset + self.length
        self.end_pos = ends % chunk_size
        if self.trivial:
            self._chunks_of_the_input(real.device)
        else:
            self._chunks_of_the_pieces(ends)

    def _rows_of_the_input(self, starts, row_offset) -> None:
        """A trivial frame: one frame row per batch row, all at the same chunk position."""
        bsz, device = self.bsz, starts.device
        self.num_rows = bsz
        self.continues = ~starts[:, 0]  # (R,) does the frame row continue the given state?
        self.src_row = torch.arange(bsz, device=device)
        self.offset = row_offset
        self.length = torch.full((bsz,), self.seq_len, dtype=torch.long, device=device)
        self.pad_front = int(row_offset[0])

    def _rows_of_the_pieces(self, real, starts, chunk_pos) -> None:
        """One frame row per piece (the real tokens of a batch row up to the next document start), longest first."""
        bsz, seq_len, device = self.bsz, self.seq_len, real.device
        seg = torch.cumsum(starts.long(), dim=1)  # piece index inside the row; 0 continues the given state
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

    def _chunks_of_the_input(self, device) -> None:
        """The frame is the input itself; its first slice completes the chunk already begun at pad_front."""
        seq_len, chunk_size = self.seq_len, self.C
        self.frame_len = seq_len
        first = min(seq_len, chunk_size - self.pad_front)
        self.chunk_bounds = [(0, first)] + [
            (lo, min(lo + chunk_size, seq_len)) for lo in range(first, seq_len, chunk_size)
        ]
        self.last_chunk = torch.full((self.bsz,), len(self.chunk_bounds) - 1, dtype=torch.long, device=device)

    def _chunks_of_the_pieces(self, ends) -> None:
        """Chunks up to the last token (the last chunk may be partial, as in a trivial frame): a short padded batch
        costs its tokens, not a whole chunk, whatever the chunk size."""
        chunk_size = self.C
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
        # selected, not multiplied: a new document's history is zeros even where the given tail holds NaN
        hist = torch.where(self.continues.view(-1, 1, 1), tail.to(x.dtype)[self.src_row], 0)
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
