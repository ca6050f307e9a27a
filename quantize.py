"""Weight-only int8 and int4 quantization of the LLM's linear layers: LLaVA-1.5-7B in 7.7 or 4.6 GB instead of 14.

In the spirit of gpt-fast's quantize.py. Decoding one token reads every weight once and does little arithmetic with
it, so its speed is set by the bytes read: storing the weights in 8 or 4 bits (the activations stay in the model's
dtype) shrinks both the memory and the time per token. Each quantized layer is a drop-in replacement of nn.Linear:

    int8   one scale per output row, symmetric:     w ≈ q · s,            q ∈ [-127, 127]
    int4   a scale and a zero per group of 128      w ≈ (q - 8) · s + z,  q ∈ [0, 15], two q per byte
           input columns of a row, asymmetric:

Only the decoder layers' q, k, v, o, gate, up and down projections are quantized (`llm_linears` says why). Loading
quantizes each weight as it is read (plumbing/checkpoints.py, `load_llava(..., quantize=)`), so that the float model
never exists whole; `python quantize.py` writes a quantized checkpoint that loads without the float weights.

Shapes: N output features (rows of a weight), K input features (its columns), G columns per int4 group, M rows of
input (batch × tokens).
"""

import argparse
import os
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# int8: one scale per output channel


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, device=device))  # (N,) in the model's dtype

    @staticmethod
    def quantize(w: torch.Tensor) -> dict:
        """A float weight (N, K) -> this layer's buffers (the scales in w's dtype).

        s = max_k |w_nk| / 127 maps each row's largest weight to ±127 and q = round(w / s) needs no clipping, so
        every weight is off by at most half a step: |w - q·s| ≤ s/2 (s/2 ≤ 0.4 % of the row's largest weight). Each
        output then errs by at most (s_n / 2) · Σ_k |x_k|. q is rounded against the scale as stored (fp16/bf16), so
        the bound holds for the scale the forward multiplies by."""
        scales = (w.abs().amax(dim=1).float() / 127).to(w.dtype)  # (N,)
        # an all-zero row has s = 0 and q = 0 / tiny = 0
        q = (w.float() / scales.float().clamp(min=1e-12)[:, None]).round_().clamp_(-127, 127)
        return {"weight": q.to(torch.int8), "scales": scales}

    def dequantize(self, dtype) -> torch.Tensor:  # (N, K) = q · s
        return self.weight.to(dtype) * self.scales.to(dtype)[:, None]

    def forward(self, x):  # (..., K) -> (..., N)
        if x.requires_grad:  # QLoRA: LoRA trains over this layer, and torch's int8 kernel has no backward
            return F.linear(x, self.dequantize(x.dtype))
        if x.device.type == "cpu":  # torch's int8 matmul reads the int8 bytes as they are (fast in bf16)
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight, self.scales)
            return y.view(*x.shape[:-1], self.out_features)
        # a row's scale factors out of its dot product, y_n = s_n · Σ_k q_nk x_k, so it multiplies the outputs.
        # Eager, the cast writes a float copy of the weight first; torch.compile fuses it into the matmul, which then
        # reads 1 byte per weight (torch's CUDA _weight_int8pack_mm is a plain loop per output, not a tuned kernel)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales


# -----------------------------------------------------------------------------
# int4: a scale and a zero point per group of input columns, two weights per byte


def group_size(in_features: int) -> int:
    """128 columns per group, as gpt-fast; 64 or 32 where the width is no multiple of 128 (the toy's MLP, 352)."""
    return next(g for g in (128, 64, 32) if in_features % g == 0)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) bytes -> (N, K) codes 0..15: byte j holds column 2j in its high half, column 2j+1 in its low half."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).view(packed.shape[0], -1)


class Int4Linear(nn.Module):
    """The forward runs torch's own int4 matmul, `_weight_int4pack_mm` (tinygemm's tensor-core kernel, CUDA compute
    capability 8.0 and up; bf16 activations) or `_weight_int4pack_mm_for_cpu` (fast in bf16), which dequantize the
    4-bit weights as they load them: ŵ = (q - 8) · s + z. The tests hold the CPU kernel to that formula."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        # the kernels' tiles: groups of 32, 64 or 128 columns; 16 output rows (CPU), 8 (CUDA)
        assert in_features % 32 == 0 and out_features % 16 == 0, f"int4 needs K % 32 == 0 and N % 16 == 0, not " \
                                                                 f"K {in_features}, N {out_features}"
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size(in_features)
        # as saved, in the plain layout: (N, K/2) bytes, two codes per byte (unpack_int4)
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        # (K/G, N, 2): group g of output n has scale [g, n, 0] and zero [g, n, 1], the layout the kernels read
        self.register_buffer("scales_and_zeros", torch.empty(in_features // self.group_size, out_features, 2,
                                                             device=device))
        self.packed = False  # weight in the kernel's own layout (pack), from the first forward on

    @staticmethod
    def quantize(w: torch.Tensor) -> dict:
        """A float weight (N, K) -> this layer's buffers (scales and zeros in w's dtype).

        Per group: s = (max - min) / 15 spreads the 16 codes over the group's range, and z = min + 8·s is the value
        of code 8, which the kernels subtract (ŵ = (q - 8)·s + z = min + q·s). q = round((w - min) / s), so
        |w - ŵ| ≤ s/2 = (max - min) / 30 per weight, and each output errs by at most Σ_k |x_k| · s_(n, group of k) / 2.
        The zero point spends all 16 codes on [min, max] even when a group is not centred on 0."""
        N, K = w.shape
        G = group_size(K)
        groups = w.float().view(N, K // G, G)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # (N, K/G)
        scales = ((high - low) / 15).to(w.dtype)
        zeros = (low + 8 * scales.float()).to(w.dtype)
        code_0 = zeros.float() - 8 * scales.float()  # = min, up to the rounding of s and z as stored
        q = (groups - code_0[..., None]).div_(scales.float().clamp(min=1e-12)[..., None]).round_().clamp_(0, 15)
        q = q.to(torch.uint8).view(N, K)
        return {"weight": q[:, 0::2] << 4 | q[:, 1::2],  # (N, K/2)
                "scales_and_zeros": torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()}

    def pack(self):
        """Put the weight into the layout the kernel reads on this device: its own, made for the kernel's loads
        (tensor-core tiles on CUDA; on the CPU, blocks that depend on the instruction set), so never saved."""
        if self.weight.device.type == "cuda":
            inner_k_tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)
            self.weight = torch.ops.aten._convert_weight_to_int4pack(self.weight, inner_k_tiles)
            self.scales_and_zeros = self.scales_and_zeros.to(torch.bfloat16)  # tinygemm computes in bf16
        else:
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(self.weight).int(), 1)
        self.packed = True

    def dequantize(self, dtype) -> torch.Tensor:
        """The float weight (N, K) = (q - 8) · s + z, group by group, from the plain layout."""
        N, K, G = self.out_features, self.in_features, self.group_size
        scales, zeros = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (N, K/G) each
        codes = unpack_int4(self.weight).view(N, K // G, G).float()
        return ((codes - 8) * scales[..., None] + zeros[..., None]).view(N, K).to(dtype)

    def forward(self, x):  # (..., K) -> (..., N)
        if x.requires_grad:  # QLoRA: LoRA trains over this layer, and torch's int4 kernels have no backward
            assert not self.packed, "an int4 layer that has answered (its weight packed for the kernel) cannot train"
            return F.linear(x, self.dequantize(x.dtype))
        if not self.packed:  # once, on the device the model runs on
            self.pack()
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), self.weight, self.group_size,
                                                   self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.weight, self.group_size,
                                                           self.scales_and_zeros)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.packed:
            raise RuntimeError("an int4 model is saved before it runs: its weights are then in the kernel's own layout")
        super()._save_to_state_dict(destination, prefix, keep_vars)


def has_int4_kernel(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


# -----------------------------------------------------------------------------
# which layers


QUANTIZED = {"int8": Int8Linear, "int4": Int4Linear}  # the --quantize modes


def llm_linears(model: nn.Module) -> dict:
    """The layers quantized, by name in a Llava (or a Llama): the q, k, v, o, gate, up and down projections of every
    decoder layer (92 % of LLaVA-1.5-7B's weights).

    The vision tower and projector (5 %) keep the model's dtype, and so do the embedding (a lookup, not a matmul) and
    lm_head (2 % each): lm_head's error would fall straight on the logits that pick each token, for 2 % of the memory
    (GPTQ's and AWQ's tools leave it in float too)."""
    llm, prefix = (model.language_model, "language_model.") if hasattr(model, "language_model") else (model, "")
    return {f"{prefix}layers.{i}.{name}": module for i, layer in enumerate(llm.layers)
            for name, module in layer.named_modules() if isinstance(module, nn.Linear)}


def swap_in(model: nn.Module, mode: str):
    """Replace each of llm_linears(model) by an empty quantized layer of its shape, on its device (meta, while
    loading: load_weights then fills it)."""
    for name, linear in llm_linears(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                QUANTIZED[mode](linear.in_features, linear.out_features, linear.weight.device))


def quantized_mode(model: nn.Module):
    """"int8" or "int4" for a quantized model (what its saved config.json records), None for a float one."""
    return next((mode for module in model.modules() for mode, cls in QUANTIZED.items() if type(module) is cls), None)


# -----------------------------------------------------------------------------
# a quantized checkpoint


def main(argv=None):
    """python quantize.py --model DIR --quantize int4 --out DIR"""
    from plumbing.checkpoints import load_llava, read_config, save_llava  # which import this file
    from plumbing.cli import DTYPES, one_line_errors
    p = argparse.ArgumentParser(description="Write a copy of a LLaVA model with its LLM's linear layers quantized "
                                "(llava-hf layout), which chat.py, eval.py and load_llava load as they are, without "
                                "the float weights. Quantizing takes the CPU and about the quantized model's memory.")
    p.add_argument("--model", required=True, metavar="DIR", help="ours, llava-hf or original LLaVA layout")
    p.add_argument("--vision-tower", metavar="DIR", help="the CLIP directory of an original-layout model")
    p.add_argument("--quantize", required=True, choices=QUANTIZED)
    p.add_argument("--out", required=True, metavar="DIR", help="a new directory")
    p.add_argument("--dtype", choices=DTYPES, help="of the parts left in float and of the scales (default: the "
                   "checkpoint's own, else fp16)")
    args = p.parse_args(argv)
    if os.path.exists(args.out):
        p.error(f"--out {args.out}: exists; give a new directory")
    with one_line_errors("quantize.py: "):
        config = read_config(args.model)  # transformers 5 writes "dtype", earlier versions and ours "torch_dtype"
        saved = {str(dtype).removeprefix("torch."): dtype for dtype in DTYPES.values()}
        dtype = DTYPES[args.dtype] if args.dtype else saved.get(config.get("torch_dtype") or config.get("dtype"),
                                                                  torch.float16)
        model = load_llava(args.model, args.vision_tower, dtype, "cpu", quantize=args.quantize)
        save_llava(model, args.out)
    for name in os.listdir(args.model):  # the tokenizer, train_config.json (its template), processor configs
        path = os.path.join(args.model, name)
        weights = name.endswith((".safetensors", ".bin", ".index.json"))
        if os.path.isfile(path) and name != "config.json" and not weights:
            shutil.copy(path, args.out)
    print(f"{args.out}: {args.model} with its LLM's linear layers in {args.quantize}")


if __name__ == "__main__":
    main()
