"""The LLaMA decoder (the language model of LLaVA-1.5: Vicuna-v1.5, a fine-tuned LLaMA-2), with a KV cache and sampling.

Reproduces transformers' `LlamaForCausalLM` (models/llama/modeling_llama.py) numerically: RMSNorm in fp32, rotary position embeddings in the
"rotate-half" layout that HF and LLaVA checkpoints are stored in (so no weight permutation is needed), SwiGLU MLP,
grouped-query attention. Module names follow the HF checkpoint keys (`model.` prefix dropped).

The KV cache follows gpt-fast: one preallocated buffer per layer, written at the slots `input_pos` of the current
tokens, and attention always runs over all slots with a mask. Shapes never change while decoding, so a decode step
can be captured as a CUDA graph.

Shapes: B batch, T tokens in this forward, S cache slots (or T without a cache), C hidden size, nh query heads,
nkv key/value heads, hs head size, V vocabulary.
"""

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config


@dataclass
class LlamaConfig:  # field names are transformers' so a config.json maps one to one
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32  # < num_attention_heads: grouped-query attention (LLaMA-2-70B style)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self):
        assert self.hidden_size % self.num_attention_heads == 0
        assert self.num_attention_heads % self.num_key_value_heads == 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_name(cls, name: str) -> "LlamaConfig":
        return cls(**LLAMA_PRESETS[name])

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        hf = dict(hf)
        if hf.get("rope_theta") is None:  # transformers 5 moved it into rope_parameters; 4.31-era configs lack it
            hf["rope_theta"] = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        hf.setdefault("num_key_value_heads", hf.get("num_attention_heads", 32))
        for unsupported in ("rope_scaling", "attention_bias", "mlp_bias"):
            assert not hf.get(unsupported), f"{unsupported}={hf[unsupported]!r} is not supported (LLaMA-2 has none)"
        return cls(**{k: hf[k] for k in asdict(cls()) if hf.get(k) is not None})

    def to_hf(self) -> dict:
        return dict(asdict(self), model_type="llama", hidden_act="silu", tie_word_embeddings=False)


LLAMA_PRESETS = {
    "vicuna-7b-v1.5": dict(),
    "vicuna-13b-v1.5": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                            num_key_value_heads=40),
    # the toy world's LM (vocab_size comes from its tokenizer), trained by toy.py's stage 0; one key-value head per
    # query head, as Vicuna-7B
    "toy": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=512),
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256),
}

# -----------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in fp32 and cast back *before* the weight multiply, exactly as HF (matters in bf16)
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """(B, T) positions -> cos, sin of shape (B, 1, T, hs), computed in fp32 then cast, as HF."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, hs/2)
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, hs): rotate-half pairs dim i with i + hs/2
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # rotate_half
    return x * cos + rotated * sin


class KVCache(nn.Module):
    """Preallocated keys and values for every slot of every sequence in the batch."""

    def __init__(self, batch_size, n_kv_heads, max_seq_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)  # (B, nkv, S, hs)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        """Write this step's (B, nkv, T, hs) keys/values at slots input_pos (T,); return all S slots."""
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                      config.head_dim)
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=False)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, cos, sin, mask, input_pos):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, S, hs)
        # SDPA picks a flash / memory-efficient kernel; with no mask the causal structure is implicit
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin, mask, input_pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# the model


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False

    def forward(self, embeds, position_ids=None, mask=None, input_pos=None):
        """(B, T, C) input embeddings -> (B, T, C) final hidden states; `lm_head` turns them into logits.

        Returning hidden states lets the training loss apply `lm_head` only where labels are supervised.
        position_ids (B, T): the RoPE positions (default 0..T-1). mask: None for plain causal attention, else a bool
        (B, 1, T, S) "may attend" mask, see `attention_mask`. input_pos (T,): the cache slots to write (with a cache).
        """
        B, T, _ = embeds.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=embeds.device).expand(B, T)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, embeds.dtype)
        x = embeds
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                # recompute each block's activations in backward instead of storing them: ~1/3 more compute for
                # activation memory that no longer grows with depth
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, input_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, input_pos)
        return self.norm(x)

    def compile_layers(self):
        """Compile each decoder layer for training (torch.compile, one layer at a time: "regional compilation").

        The identical layers share one compiled graph, and gradient checkpointing and FSDP still wrap plain layers.
        Inductor fuses the elementwise chains that eager runs as separate kernels, each reading and writing the
        activations again (RMSNorm's fp32 upcast, RoPE, SwiGLU's silu·mul, the residual adds), and keeps fewer of
        them for backward (docs/training.md has the memory it saves)."""
        for layer in self.layers:
            layer.compile()

    def decode_step(self, token, position_ids, input_pos, key_valid):
        """One new token per sequence, (B,) at cache slot input_pos (1,) -> next-token logits (B, V).

        Every shape stays the same from step to step (the cache is preallocated, attention spans all its slots), so
        torch.compile(mode="reduce-overhead") can record the whole step once as a CUDA graph and replay it: at batch
        1 a decode step is dozens of small kernels whose launch overhead would otherwise dominate."""
        hidden = self(self.embed_tokens(token)[:, None], position_ids, attention_mask(key_valid, input_pos), input_pos)
        return self.lm_head(hidden[:, -1])

    def setup_cache(self, batch_size: int, max_seq_len: int):
        """Allocate a KV cache of `max_seq_len` slots per sequence on the model's device and dtype.

        A cache of that shape that is still allocated (kept by the previous generation) is reused as it is, as
        gpt-fast does: a CUDA graph recorded by torch.compile reads and writes the cache at its buffers' addresses,
        and new buffers would make it record the graph again. Stale slots are never read: a query attends only slots
        at or before its own, and generation writes those first."""
        p = self.embed_tokens.weight
        cache = self.layers[0].self_attn.kv_cache
        shape = (batch_size, self.config.num_key_value_heads, max_seq_len, self.config.head_dim)
        if cache is not None and cache.k.shape == shape and cache.k.dtype == p.dtype and cache.k.device == p.device:
            return
        for layer in self.layers:
            attn = layer.self_attn
            attn.kv_cache = KVCache(batch_size, attn.n_kv_head, max_seq_len, attn.head_dim, p.dtype, p.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.self_attn.kv_cache = None


def attention_mask(key_valid: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """The (B, 1, T, S) mask "query at slot input_pos[t] may attend key slot s" = causal and not padding.

    key_valid (B, S) is False at padding slots. A padding query (left padding) would see no key at all and SDPA would
    return NaN, so every query may always attend its own slot; those outputs are never used.
    """
    slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    causal = slots[None, :] <= input_pos[:, None]  # (T, S)
    itself = slots[None, :] == input_pos[:, None]
    return ((causal[None] & key_valid[:, None, :]) | itself[None])[:, None]  # (B, 1, T, S)


# -----------------------------------------------------------------------------
# sampling


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens. temperature 0 is greedy; top_p < 1 keeps the smallest set of most likely
    tokens whose probability reaches top_p (nucleus sampling)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the mass before this token already reaches top_p
        outside[:, 0] = False  # the most likely token always stays (HF's min_tokens_to_keep), even at top_p 0
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    # argmax(p / Exp(1)) draws from p (the exponential race) with no host sync, unlike torch.multinomial
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)

