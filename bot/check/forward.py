"""A layer-by-layer forward pass of Llama, Mistral and Qwen2-style decoders, streaming weights from disk.

Why not transformers: loading a 70B merge takes 140 GB; the gate must run on a 16 GB runner. Here the weights
stay memory-mapped (`mergebot.io.weights.ModelWeights`: file-backed pages, no anonymous copies) and only one weight
matrix (or a bounded slice of one) is converted to float32 at a time. What stays resident between layers is the
hidden states of the sequences being evaluated and, during generation, a per-layer KV cache of a few prompts.
The vocabulary projection is done in row chunks with a streaming log-sum-exp, so a 128K-token vocabulary never
materializes a [tokens, vocab] float32 matrix.

The math follows transformers' modeling code for these families (RMSNorm in float32, rotate-half RoPE with the
`default`, `linear` and `llama3` frequency rules, grouped-query attention, SiLU-gated MLP, Qwen2's q/k/v biases,
tied embeddings, Mistral's and Qwen2's sliding windows) so that on float32 models the perplexity equals
transformers' own to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mergebot.check.decoder import DecoderSpec
from mergebot.errors import ModelError
from mergebot.io.weights import ModelWeights

_GEMV_ROWS = 4
DEFAULT_BUDGET = 1 << 23  # float32 elements in one working block (32 MB): weight slices, scores, logits


@dataclass
class _Seq:
    """One sequence in flight: the hidden states of its new tokens, their positions, and (generation only) the
    keys and values of every earlier token, per layer."""

    h: torch.Tensor  # [T, hidden] float32
    positions: torch.Tensor  # [T] int64
    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)


class LayerwiseModel:
    """A decoder evaluated one layer at a time from memory-mapped weights; see the module docstring."""

    def __init__(self, directory: Path, label: str, config: dict, device: torch.device,
                 budget: int = DEFAULT_BUDGET):
        self.spec = DecoderSpec.from_config(config, label)
        self.label = label
        self.device = device
        self.budget = max(1 << 12, budget)
        self.weights = ModelWeights(directory, label)
        s = self.spec
        self.embed_name = "model.embed_tokens.weight"
        self.head_name = self.embed_name if s.tied else "lm_head.weight"
        self._require(self.embed_name, (s.vocab, s.hidden), allow_rows=True)
        if not s.tied and self.head_name not in self.weights.keys():
            raise ModelError(f"{label}: lm_head.weight is missing and tie_word_embeddings is false")
        self._require(self.head_name, (s.vocab, s.hidden), allow_rows=True)
        self.vocab_rows = self.weights.header(self.head_name).shape[0]
        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
        for i in range(s.layers):
            p = f"model.layers.{i}."
            for suffix, shape in (("self_attn.q_proj.weight", (q, s.hidden)),
                                  ("self_attn.k_proj.weight", (kv, s.hidden)),
                                  ("self_attn.v_proj.weight", (kv, s.hidden)),
                                  ("self_attn.o_proj.weight", (s.hidden, q)),
                                  ("mlp.gate_proj.weight", (s.intermediate, s.hidden)),
                                  ("mlp.up_proj.weight", (s.intermediate, s.hidden)),
                                  ("mlp.down_proj.weight", (s.hidden, s.intermediate)),
                                  ("input_layernorm.weight", (s.hidden,)),
                                  ("post_attention_layernorm.weight", (s.hidden,))):
                self._require(p + suffix, shape)
        self._require("model.norm.weight", (s.hidden,))
        self.inv_freq = s.inv_freq().to(device)
        self._scratch: list[torch.Tensor | None] = [None, None, None]

    def _require(self, name: str, shape: tuple[int, ...], allow_rows: bool = False) -> None:
        """A tensor the pass needs, of the shape config.json implies (embeddings may have padded rows)."""
        if name not in self.weights.keys():
            raise ModelError(f"{self.label}: tensor {name} is missing")
        got = self.weights.header(name).shape
        if allow_rows and len(got) == 2 and got[1] == shape[1] and got[0] >= 1:
            return
        if tuple(got) != shape:
            raise ModelError(f"{self.label}: tensor {name} has shape {list(got)}, config.json implies {list(shape)}")

    # ------------------------------------------------------------------ weights
    def _w(self, name: str, rows: slice | None = None, cols: slice | None = None,
           slot: int | None = None) -> torch.Tensor:
        """A weight (or a slice of it) as float32 on the device. A float32 weight on the CPU is the mmap'd view
        itself (no copy). Anything else is converted into scratch buffer `slot` (0-2: at most three converted
        matrices are alive at once), reused from layer to layer, so a decoding step that re-streams every
        layer does not page-fault a fresh allocation per matrix."""
        t = self.weights.get(name)
        if rows is not None:
            t = t[rows]
        if cols is not None:
            t = t[:, cols]
        if t.dtype == torch.float32 and self.device.type == "cpu":
            return t
        if slot is None:
            return t.to(self.device).float()
        n = t.numel()
        buf = self._scratch[slot]
        if buf is None or buf.numel() < n:
            self._scratch[slot] = None
            buf = self._scratch[slot] = torch.empty(n, dtype=torch.float32, device=self.device)
        out = buf[:n].view(t.shape)
        out.copy_(t)
        return out

    def _bias(self, name: str) -> torch.Tensor | None:
        return self._w(name) if name in self.weights.keys() else None

    def _done(self, prefix: str) -> None:
        """Give back the pages of a finished layer (they are file-backed; this keeps RSS flat too)."""
        for name in list(self.weights.keys()):
            if name.startswith(prefix):
                self.weights.release(name)

    # ------------------------------------------------------------------ the pass
    def embed(self, ids: list[int]) -> torch.Tensor:
        rows = self.weights.header(self.embed_name).shape[0]
        bad = [i for i in ids if not 0 <= i < rows]
        if bad:
            raise ModelError(f"{self.label}: token id {bad[0]} is outside the embedding matrix ({rows} rows): the "
                             "tokenizer does not fit the model")
        index = torch.tensor(ids, dtype=torch.int64)
        return self.weights.get(self.embed_name)[index].to(self.device).float()

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """x @ w.T + b. A few rows on the CPU go through matrix-vector products: torch's GEMM for 2-4 rows reads
        the weight about twice as slowly as GEMV does, and decoding steps are exactly that case."""
        if x.shape[0] <= _GEMV_ROWS and self.device.type == "cpu":
            y = torch.stack([torch.mv(w, row) for row in x]) if x.shape[0] else x.new_zeros((0, w.shape[0]))
            return y if b is None else y + b
        return F.linear(x, w, b)

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.spec.eps))

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [heads, T, head_dim]; rotate-half RoPE as in transformers."""
        freqs = positions.to(self.device).float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor,
                window: int | None) -> torch.Tensor:
        """Causal grouped-query attention in query blocks, so the score matrix stays within the budget.
        q: [heads, T, d]; k, v: [kv_heads, S, d] -> [T, heads * d]."""
        s = self.spec
        heads, T, d = q.shape
        S = k.shape[1]
        rep = heads // s.kv_heads
        qg = q.reshape(s.kv_heads, rep, T, d)
        kt = k.unsqueeze(1).transpose(-1, -2)
        vg = v.unsqueeze(1)
        scale = s.head_dim ** -0.5
        out = torch.empty_like(qg)
        block = max(1, self.budget // max(1, heads * S))
        qpos, kpos = qpos.to(self.device), kpos.to(self.device)
        for t0 in range(0, T, block):
            t1 = min(T, t0 + block)
            scores = torch.matmul(qg[:, :, t0:t1], kt) * scale
            allowed = kpos[None, :] <= qpos[t0:t1, None]
            if window is not None:
                allowed &= kpos[None, :] > qpos[t0:t1, None] - window
            scores.masked_fill_(~allowed, float("-inf"))
            out[:, :, t0:t1] = torch.matmul(torch.softmax(scores, dim=-1), vg)
        return out.reshape(heads, T, d).transpose(0, 1).reshape(T, heads * d)

    def _layer(self, i: int, seqs: list[_Seq], cache: bool) -> None:
        """One decoder layer over every sequence. The projections see all sequences' tokens as one matrix
        (each weight is read once per pass); only attention is per sequence."""
        s = self.spec
        p = f"model.layers.{i}."
        sizes = [q.h.shape[0] for q in seqs]
        h = torch.cat([q.h for q in seqs]) if len(seqs) > 1 else seqs[0].h
        x = self._rms(h, self._w(p + "input_layernorm.weight"))
        projected = []
        for slot, part in enumerate("qkv"):
            w = self._w(f"{p}self_attn.{part}_proj.weight", slot=slot)
            projected.append(self._linear(x, w, self._bias(f"{p}self_attn.{part}_proj.bias")).split(sizes))
            del w
        del x
        attended = []
        for n, q in enumerate(seqs):
            T = sizes[n]
            qh = self._rope(projected[0][n].reshape(T, s.heads, s.head_dim).transpose(0, 1), q.positions)
            kh = self._rope(projected[1][n].reshape(T, s.kv_heads, s.head_dim).transpose(0, 1), q.positions)
            vh = projected[2][n].reshape(T, s.kv_heads, s.head_dim).transpose(0, 1)
            kpos = q.positions
            if cache:
                past_k, past_v = q.keys[i], q.values[i]
                if past_k is not None and past_v is not None:
                    kh = torch.cat((past_k, kh), dim=1)
                    vh = torch.cat((past_v, vh), dim=1)
                q.keys[i], q.values[i] = kh, vh
                kpos = torch.arange(kh.shape[1])
            attended.append(self._attend(qh, kh, vh, q.positions, kpos, s.windows[i]))
        del projected
        a = torch.cat(attended) if len(attended) > 1 else attended[0]
        del attended
        w = self._w(p + "self_attn.o_proj.weight", slot=0)
        h = h + self._linear(a, w, self._bias(p + "self_attn.o_proj.bias"))
        del w, a
        h = h + self._mlp(p, self._rms(h, self._w(p + "post_attention_layernorm.weight")))
        for q, part in zip(seqs, h.split(sizes)):
            q.h = part
        self._done(p)

    def _mlp(self, p: str, x: torch.Tensor) -> torch.Tensor:
        """down(silu(gate x) * up x), in slices of the intermediate dimension when one matrix would exceed the
        budget (the sum over slices is the same product), and in token blocks for long inputs."""
        s = self.spec
        rows = max(1, self.budget // s.hidden)
        out: torch.Tensor | None = None
        for c0 in range(0, s.intermediate, rows):
            cut = slice(c0, min(s.intermediate, c0 + rows))
            gate = self._w(p + "mlp.gate_proj.weight", cut, slot=0)
            up = self._w(p + "mlp.up_proj.weight", cut, slot=1)
            down = self._w(p + "mlp.down_proj.weight", cols=cut, slot=2)
            gb, ub = (self._w(p + f"mlp.{n}_proj.bias", cut) if (p + f"mlp.{n}_proj.bias") in self.weights.keys() else None
                      for n in ("gate", "up"))
            tokens = max(1, self.budget // (cut.stop - cut.start))
            parts = []
            for t0 in range(0, x.shape[0], tokens):
                xb = x[t0:t0 + tokens]
                parts.append(self._linear(F.silu(self._linear(xb, gate, gb)) * self._linear(xb, up, ub), down))
            y = torch.cat(parts) if len(parts) > 1 else parts[0]
            out = y if out is None else out + y
            del gate, up, down, gb, ub
        db = self._bias(p + "mlp.down_proj.bias")
        assert out is not None  # at least one column block
        return out if db is None else out + db

    def _run(self, seqs: list[_Seq], cache: bool) -> None:
        """Every layer over every sequence, then the final norm."""
        for i in range(self.spec.layers):
            self._layer(i, seqs, cache)
        norm = self._w("model.norm.weight")
        for q in seqs:
            q.h = self._rms(q.h, norm)

    def _head_rows(self, tokens: int) -> int:
        return max(1, min(self.budget // self.spec.hidden, self.budget // max(1, tokens)))

    # ------------------------------------------------------------------ what the check asks
    @torch.inference_mode()
    def nll(self, windows: list[list[int]]) -> tuple[float, int]:
        """(sum of -log p(token | previous tokens), number of predicted tokens) over independent windows: what
        transformers' causal-LM loss averages (labels = input ids, each window's first token unpredicted)."""
        windows = [w for w in windows if len(w) >= 2]
        if not windows:
            return 0.0, 0
        seqs = [_Seq(self.embed(w), torch.arange(len(w))) for w in windows]
        self._run(seqs, cache=False)
        h = torch.cat([q.h[:-1] for q in seqs])
        del seqs
        targets = torch.tensor([t for w in windows for t in w[1:]], dtype=torch.int64, device=self.device)
        N = h.shape[0]
        run_max = torch.full((N,), float("-inf"), device=self.device)
        run_sum = torch.zeros(N, device=self.device)
        target_logit = torch.zeros(N, device=self.device)
        rows = self._head_rows(N)
        for v0 in range(0, self.vocab_rows, rows):
            v1 = min(self.vocab_rows, v0 + rows)
            logits = self._linear(h, self._w(self.head_name, slice(v0, v1), slot=0))
            inside = (targets >= v0) & (targets < v1)
            if inside.any():
                picked = logits.gather(1, (targets - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
                target_logit = torch.where(inside, picked, target_logit)
            new_max = torch.maximum(run_max, logits.max(dim=-1).values)
            # in place: the chunk's exp(logits - max) needs no second [tokens, rows] block
            run_sum = run_sum * torch.exp(run_max - new_max) + logits.sub_(new_max[:, None]).exp_().sum(-1)
            run_max = new_max
            del logits
        self.weights.release(self.head_name)
        nll = (run_max + torch.log(run_sum) - target_logit).double()
        return float(nll.sum().item()), N

    def _argmax(self, h: torch.Tensor) -> list[int]:
        """Greedy next tokens for the rows of h, vocabulary chunk by chunk (ties go to the lowest id, as
        torch.argmax over the whole row would)."""
        best = torch.full((h.shape[0],), float("-inf"), device=self.device)
        arg = torch.zeros(h.shape[0], dtype=torch.int64, device=self.device)
        rows = self._head_rows(h.shape[0])
        for v0 in range(0, self.vocab_rows, rows):
            logits = self._linear(h, self._w(self.head_name, slice(v0, min(self.vocab_rows, v0 + rows)), slot=0))
            m, a = logits.max(dim=-1)
            better = m > best
            best = torch.where(better, m, best)
            arg = torch.where(better, a + v0, arg)
        return [int(x) for x in arg.tolist()]

    @torch.inference_mode()
    def greedy(self, prompts: list[list[int]], max_new: int, stop: set[int]) -> list[list[int]]:
        """Greedy continuations (stop tokens included when produced), all prompts advanced together so each
        step streams the weights once. Each prompt keeps its own KV cache."""
        seqs = [_Seq(self.embed(pr), torch.arange(len(pr)), [None] * self.spec.layers, [None] * self.spec.layers)
                for pr in prompts]
        outputs: list[list[int]] = [[] for _ in prompts]
        live = [n for n, pr in enumerate(prompts) if pr]
        seqs_live = [seqs[n] for n in live]
        if max_new <= 0 or not live:
            return outputs
        self._run(seqs_live, cache=True)
        lengths = {n: len(prompts[n]) for n in live}
        for step in range(max_new):
            tokens = self._argmax(torch.cat([q.h[-1:] for q in seqs_live]))
            still = []
            for n, tok in zip(live, tokens):
                outputs[n].append(tok)
                if tok not in stop:
                    still.append(n)
            live = still
            if not live or step == max_new - 1:
                break
            seqs_live = []
            for n in live:
                q = seqs[n]
                q.h = self.embed([outputs[n][-1]])
                q.positions = torch.tensor([lengths[n]])
                lengths[n] += 1
                seqs_live.append(q)
            self._run(seqs_live, cache=True)
        return outputs
