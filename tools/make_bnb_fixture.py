#!/usr/bin/env python3
"""Make tiny pre-quantized bitsandbytes checkpoints, in transformers' serialization, for BioQuant tests.

usage: python3 tools/make_bnb_fixture.py [OUTDIR]     (default: tests/fixtures/bnb)

Pure Python (no torch, numpy or bitsandbytes; none is installed where the tests are made).
The source is tests/fixtures/models/llama/f32 (hidden 64, intermediate 128, 2 layers; every linear
in-dim is 64 or 128). For each variant it writes OUTDIR/<variant>/:

  config.json                        the f32 config + dtype float16 + a `quantization_config`
  generation_config.json             copied
  model.safetensors                  what `model.save_pretrained()` writes after
                                     `from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`
  dequant_reference.safetensors      F32 dequantized weights of a few layers (see REFERENCE_LAYERS)

Variants: nf4 (no nested absmax), nf4-dq (bnb_4bit_use_double_quant), fp4 (transformers' default
4-bit type), int8 (load_in_8bit).

What is emulated (bitsandbytes main / 0.4x, csrc + functional.py + nn/modules.py; transformers
quantizers/quantizer_bnb_{4,8}bit.py + integrations/bitsandbytes.py):
- transformers forces torch_dtype=float16 when none is given, so every weight is cast to float16
  first (round to nearest even) and the unquantized tensors (embeddings, norms, lm_head) are saved
  as F16. lm_head is not converted (get_keys_to_not_convert).
- quantize_4bit, blocksize 64, over the flattened row-major [out, in] matrix (kQuantizeBlockwise):
  absmax = max |x| of the block (f32); x is normalised as x * (1.0f / absmax) in f32; the code is
  dQuantizeNF4 / dQuantizeFP4 (decision trees on f32 midpoints, strict `>`; fp4 takes the sign from
  x < 0); byte k = code(x[2k]) << 4 | code(x[2k+1]). Packed as U8 [n/2, 1]; absmax F32 [n/64].
- compress_statistics (nested): offset = absmax.mean(); quantize_blockwise(absmax - offset,
  blocksize=256, code=create_dynamic_map(signed=True)): per 256 block absmax2 = max |a|, x = a *
  (1.0f / absmax2), code = dQuantize (7-step binary search from pivot 127 with i = 64 .. 1, then the
  f32 midpoint (neighbour + val) * 0.5f decides; `>` upwards, `<` downwards). absmax is stored as U8
  codes, state2 as nested_absmax F32, nested_quant_map F32[256]; offset.item() goes in the JSON.
  torch's CUDA mean sums in an order we cannot reproduce; here offset = f32(exact sum / n). The
  checkpoint carries the offset it was made with, so loaders never depend on this.
- The dynamic map: create_dynamic_map's float32 values as torch computes them on x86 are recorded in
  src/bioquant/quant/bnb_quants.cpp (kDynamicMap); they are read from there and checked against the
  algorithm (linspace midpoints times 10^(i-6), in doubles) to 2^-21 relative.
- QuantState.as_dict(packed=True) + Linear4bit._save_to_state_dict: <p>.weight.absmax,
  .quant_map (get_4bit_type: nf4 values; fp4 [0, .0625, 8, 12, 4, 6, 2, 3, -0, ...] / 12 in f32,
  where Python's `-0` is the integer 0, so entry 8 is +0.0), .nested_absmax, .nested_quant_map and
  .quant_state.bitsandbytes__<type> = U8 bytes of json.dumps({quant_type, blocksize, dtype, shape,
  [nested_blocksize, nested_dtype, nested_offset]}).
- LLM.int8 (Int8Params._quantize -> int8_vectorwise_quant on the float16 weight): SCB = row absmax
  (f32), CB = __float2int_rn(x * (127 / absmax)) as I8 [out, in]; the kernel's scale is
  __fdividef(127, absmax) (approximate); here the correctly rounded f32 quotient. Saved with
  <p>.SCB F32 [out] and <p>.weight_format = U8 0-d tensor 0 (row-major).

The dequantized reference is what bitsandbytes' kernels compute in f32 (before dequantize_4bit casts
its output to quant_state.dtype, here float16): 4-bit w = f32(code_value[nibble] * absmax) with, when
nested, absmax = f32(f32(nested_quant_map[u8] * nested_absmax[i // 256]) + offset); int8 (bnb's
int8_vectorwise_dequant) w = f32(f32(CB * SCB) * f32(7.874015718698502e-3)).
Every f32 operation is done in Python doubles and rounded once to f32, which is exact for a single
+, -, * or / of f32 operands (53 >= 2 * 24 + 2).
"""

import array
import json
import math
import os
import re
import shutil
import struct
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(REPO, "tests", "fixtures", "models", "llama", "f32")
DYNAMIC_MAP_SOURCE = os.path.join(REPO, "src", "bioquant", "quant", "bnb_quants.cpp")
REFERENCE_LAYERS = [
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
]
LINEAR = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]

assert sys.byteorder == "little", "safetensors data is little-endian; this script assumes a little-endian host"

# ---------------------------------------------------------------------------------------------
# float32 / float16 rounding


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def f16(x):
    return struct.unpack("<e", struct.pack("<e", x))[0]


def f32_literal(text):  # a C float literal like 0.03979014977812767f
    return f32(float(text))


# ---------------------------------------------------------------------------------------------
# safetensors


DTYPE_SIZE = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "I32": 4, "I64": 8, "F64": 8}


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        b, end = e["data_offsets"]
        out[name] = (e["dtype"], list(e["shape"]), raw[base + b:base + end])
    return out


def write_safetensors(path, tensors, metadata):
    header = {"__metadata__": metadata}
    offset = 0
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        numel = 1
        for d in shape:
            numel *= d
        assert len(data) == numel * DTYPE_SIZE[dtype], name
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in sorted(tensors):
            f.write(tensors[name][2])


def floats_of(dtype, data):
    if dtype == "F32":
        return list(array.array("f", data))
    if dtype == "F16":
        return [v[0] for v in struct.iter_unpack("<e", data)]
    raise ValueError(dtype)


def f32_bytes(values):
    return array.array("f", values).tobytes()


def f16_bytes(values):
    return b"".join(struct.pack("<e", v) for v in values)


# ---------------------------------------------------------------------------------------------
# bitsandbytes codebooks and maps

NF4 = [f32(v) for v in [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0]]
# get_4bit_type("fp4"): torch.tensor([...]) (f32) then data.div_(data.abs().max()) in f32.
FP4 = [f32(f32(v) / 12.0) for v in [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0,
                                    -6.0, -2.0, -3.0]]
# dDequantizeFP4Tree's literals by the low three bits (sign applied separately): what the kernel uses.
FP4_TREE = {0b000: "0.00000000", 0b001: "5.208333333e-03", 0b010: "0.66666667", 0b011: "1.00000000",
            0b100: "0.33333333", 0b101: "0.50000000", 0b110: "0.16666667", 0b111: "0.25000000"}


def nf4_code(x):  # dQuantizeNF4
    t = f32_literal
    if x > t("0.03979014977812767"):
        if x > t("0.3893125355243683"):
            if x > t("0.6427869200706482"):
                return 0b1111 if x > t("0.8614784181118011") else 0b1110
            return 0b1101 if x > t("0.5016634166240692") else 0b1100
        if x > t("0.2035212516784668"):
            return 0b1011 if x > t("0.2920137718319893") else 0b1010
        return 0b1001 if x > t("0.1202552504837513") else 0b1000
    if x > t("-0.33967943489551544"):
        if x > t("-0.13791173323988914"):
            return 0b0111 if x > t("-0.045525018125772476") else 0b0110
        return 0b0101 if x > t("-0.23460740596055984") else 0b0100
    if x > t("-0.6106329262256622"):
        return 0b0011 if x > t("-0.4599952697753906") else 0b0010
    return 0b0001 if x > t("-0.8480964004993439") else 0b0000


def fp4_code(x):  # dQuantizeFP4
    t = f32_literal
    sign = 0b1000 if x < 0 else 0b0000
    x = abs(x)
    if x > t("0.29166667"):
        if x > t("0.583333"):
            return (0b0011 if x > t("0.8333333") else 0b0010) + sign
        return (0b101 if x > t("0.4166667") else 0b100) + sign
    if x > t("0.0859375"):
        return (0b0111 if x > t("0.20833333") else 0b0110) + sign
    return (0b0001 if x > t("0.00260417") else 0b0000) + sign


def nf4_value(code):  # dDequantizeNF4 (the same f32 literals as NF4)
    return NF4[code]


def fp4_value(code, absmax):  # dDequantizeFP4Tree: literal * absmax * sign, in f32
    sign = -1.0 if code & 0b1000 else 1.0
    return f32(f32(f32_literal(FP4_TREE[code & 0b111]) * absmax) * sign)


def dynamic_map():
    """create_dynamic_map(signed=True) as float32 (bnb_quants.cpp's kDynamicMap), checked."""
    text = open(DYNAMIC_MAP_SOURCE).read()
    body = re.search(r"kDynamicMap\[256\]\s*=\s*\{(.*?)\};", text, re.S).group(1)
    body = re.sub(r"//[^\n]*", "", body)
    values = []
    for tok in body.replace("\n", " ").split(","):
        tok = tok.strip()
        if not tok:
            continue
        if tok.endswith("f"):  # the float suffix (a hex mantissa is always followed by p<exp>)
            tok = tok[:-1]
        values.append(float.fromhex(tok) if "x" in tok.lower() else float(tok))
    assert len(values) == 256, len(values)
    # The algorithm (bitsandbytes/functional.py create_dynamic_map), in doubles.
    data = []
    for i in range(7):
        k = 2 ** i + 1
        b = [0.1 + (1.0 - 0.1) * j / (k - 1) for j in range(k)]
        means = [(b[j] + b[j + 1]) / 2.0 for j in range(k - 1)]
        scale = 10.0 ** (-6 + i)
        data += [scale * m for m in means] + [-scale * m for m in means]
    data += [0.0, 1.0]
    data.sort()
    for got, want in zip(values, data):
        assert abs(got - want) <= abs(want) * 2.0 ** -21, (got, want)
    assert values == sorted(values) and values[127] == 0.0 and values[255] == 1.0
    return [f32(v) for v in values]


DYN = None


def dquantize(code, x):
    """csrc dQuantize<0>: nearest entry of the 256-entry `code` to x."""
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper = -1.0, 1.0
    val = code[pivot]
    i = 64
    while i > 0:
        if x > val:
            lower_pivot, lower = pivot, val
            pivot += i
        else:
            upper_pivot, upper = pivot, val
            pivot -= i
        val = code[pivot]
        i >>= 1
    if upper_pivot == 255:
        upper = code[upper_pivot]
    if lower_pivot == 0:
        lower = code[lower_pivot]
    if x > val:
        midpoint = f32(f32(upper + val) * 0.5)
        return upper_pivot if x > midpoint else pivot
    midpoint = f32(f32(lower + val) * 0.5)
    return lower_pivot if x < midpoint else pivot


def reciprocal(a):  # 1.0f / a (IEEE division; +inf for 0 like the kernel)
    return math.inf if a == 0.0 else f32(1.0 / a)


def times(v, inv):  # f32 product; 0 * inf is NaN as on the GPU
    p = v * inv
    return p if math.isnan(p) else f32(p)


def quantize_blockwise_8bit(values, blocksize):
    """quantize_blockwise(A, code=create_dynamic_map(), blocksize) -> (u8 codes, f32 absmax)."""
    codes, absmax = [], []
    for start in range(0, len(values), blocksize):
        blk = values[start:start + blocksize]
        am = 0.0
        for v in blk:
            am = max(am, abs(v))
        absmax.append(am)
        inv = reciprocal(am)
        codes += [dquantize(DYN, times(v, inv)) for v in blk]
    return codes, absmax


def quantize_4bit(values, quant_type, nested):
    """functional.quantize_4bit(A, blocksize=64, compress_statistics=nested, quant_type)."""
    code_of = nf4_code if quant_type == "nf4" else fp4_code
    n = len(values)
    assert n % 64 == 0
    packed = bytearray()
    absmax = []
    for start in range(0, n, 64):
        blk = values[start:start + 64]
        am = 0.0
        for v in blk:
            am = max(am, abs(v))  # fmaxf(local, fabsf(x)), then a block max reduction
        absmax.append(am)
        inv = reciprocal(am)
        for k in range(32):
            packed.append(code_of(times(blk[2 * k], inv)) << 4 | code_of(times(blk[2 * k + 1], inv)))
    state = {"absmax": absmax}
    if nested:
        offset = f32(math.fsum(absmax) / len(absmax))
        codes, nested_absmax = quantize_blockwise_8bit([f32(a - offset) for a in absmax], 256)
        state.update(codes=codes, nested_absmax=nested_absmax, offset=offset)
    return bytes(packed), state


def dequantize_4bit(packed, state, quant_type):
    """The f32 values of bitsandbytes' dequantize_4bit kernel (before the cast to quant_state.dtype)."""
    if "codes" in state:
        absmax = [f32(f32(DYN[c] * state["nested_absmax"][i // 256]) + state["offset"])
                  for i, c in enumerate(state["codes"])]
    else:
        absmax = state["absmax"]
    out = []
    for i, byte in enumerate(packed):
        a = absmax[(2 * i) // 64]
        for c in (byte >> 4, byte & 0x0F):
            out.append(f32(nf4_value(c) * a) if quant_type == "nf4" else fp4_value(c, a))
    return out


def quantize_int8(values, rows, cols):
    """Int8Params._quantize: int8_vectorwise_quant on the float16 weight -> (CB ints, SCB f32)."""
    cb, scb = [], []
    for r in range(rows):
        row = values[r * cols:(r + 1) * cols]
        am = 0.0
        for v in row:
            am = max(am, abs(v))
        scb.append(am)
        scale = f32(127.0 / am) if am != 0.0 else math.inf
        for v in row:
            q = round(times(v, scale)) if am != 0.0 else 0  # __float2int_rn: round half to even
            assert -127 <= q <= 127
            cb.append(q)
    return cb, scb


def dequantize_int8(cb, scb, cols):  # int8_vectorwise_dequant: A * stats.view(-1, 1) * 7.874015718698502e-3
    k = f32(7.874015718698502e-3)
    return [f32(f32(q * scb[i // cols]) * k) for i, q in enumerate(cb)]


# ---------------------------------------------------------------------------------------------


def quantization_config(variant):
    four = variant != "int8"
    return {
        "_load_in_4bit": four,
        "_load_in_8bit": not four,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "fp4" if variant in ("fp4", "int8") else "nf4",
        "bnb_4bit_use_double_quant": variant == "nf4-dq",
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": four,
        "load_in_8bit": not four,
        "quant_method": "bitsandbytes",
    }


def make_variant(src, config, outdir, variant):
    os.makedirs(outdir, exist_ok=True)
    n_layers = config["num_hidden_layers"]
    linear = {f"model.layers.{i}.{m}.weight" for i in range(n_layers) for m in LINEAR}
    out, ref = {}, {}
    for name, (dtype, shape, data) in src.items():
        values16 = [f16(v) for v in floats_of(dtype, data)]  # torch_dtype float16
        if name not in linear:
            out[name] = ("F16", shape, f16_bytes(values16))
            continue
        rows, cols = shape
        if variant == "int8":
            cb, scb = quantize_int8(values16, rows, cols)
            out[name] = ("I8", shape, struct.pack(f"<{len(cb)}b", *cb))
            p = name[: -len(".weight")]
            out[p + ".SCB"] = ("F32", [rows], f32_bytes(scb))
            out[p + ".weight_format"] = ("U8", [], b"\x00")
            deq = dequantize_int8(cb, scb, cols)
        else:
            qt = "fp4" if variant == "fp4" else "nf4"
            nested = variant == "nf4-dq"
            packed, st = quantize_4bit(values16, qt, nested)
            out[name] = ("U8", [len(packed), 1], packed)
            qs = {"quant_type": qt, "blocksize": 64, "dtype": "float16", "shape": [rows, cols]}
            if nested:
                out[name + ".absmax"] = ("U8", [len(st["codes"])], bytes(st["codes"]))
                out[name + ".nested_absmax"] = ("F32", [len(st["nested_absmax"])], f32_bytes(st["nested_absmax"]))
                out[name + ".nested_quant_map"] = ("F32", [256], f32_bytes(DYN))
                qs.update(nested_blocksize=256, nested_dtype="float32", nested_offset=st["offset"])
            else:
                out[name + ".absmax"] = ("F32", [len(st["absmax"])], f32_bytes(st["absmax"]))
            out[name + ".quant_map"] = ("F32", [16], f32_bytes(NF4 if qt == "nf4" else FP4))
            js = json.dumps(qs).encode("utf-8")
            out[name + ".quant_state.bitsandbytes__" + qt] = ("U8", [len(js)], js)
            deq = dequantize_4bit(packed, st, qt)
        if name in REFERENCE_LAYERS:
            ref[name] = ("F32", shape, f32_bytes(deq))
    write_safetensors(os.path.join(outdir, "model.safetensors"), out, {"format": "pt"})
    write_safetensors(os.path.join(outdir, "dequant_reference.safetensors"), ref, {
        "format": "pt",
        "source": "tests/fixtures/models/llama/f32 via tools/make_bnb_fixture.py " + variant,
        "meaning": "f32 values of bitsandbytes' dequantization kernels (before the cast to the layer dtype)",
    })
    cfg = dict(config)
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = "float16"
    cfg["quantization_config"] = quantization_config(variant)
    with open(os.path.join(outdir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    gen = os.path.join(os.path.dirname(SRC), "f32", "generation_config.json")
    if os.path.exists(gen):
        shutil.copyfile(gen, os.path.join(outdir, "generation_config.json"))


def main():
    global DYN
    outroot = sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, "tests", "fixtures", "bnb")
    DYN = dynamic_map()
    # Spot checks of the emulation against known behaviour of the kernels.
    assert nf4_code(1.0) == 15 and nf4_code(-1.0) == 0 and nf4_code(0.0) == 7
    assert fp4_code(-0.0) == 0 and fp4_code(1.0) == 0b0011 and fp4_code(-1.0) == 0b1011
    assert dquantize(DYN, 1.0) == 255 and dquantize(DYN, 0.0) == 127 and dquantize(DYN, -1.0) == 0
    assert all(dquantize(DYN, v) == i for i, v in enumerate(DYN) if i not in (0,)) and dquantize(DYN, DYN[0]) == 0
    src = read_safetensors(os.path.join(SRC, "model.safetensors"))
    with open(os.path.join(SRC, "config.json")) as f:
        config = json.load(f)
    for variant in ["nf4", "nf4-dq", "fp4", "int8"]:
        make_variant(src, config, os.path.join(outroot, variant), variant)
        print("wrote", os.path.join(outroot, variant))


if __name__ == "__main__":
    main()
