#!/usr/bin/env python3
"""Generate reference tokenizer fixtures for BioQuant's C++ tokenizers.

usage:
  python3 tools/make_tokenizer_fixtures.py stage  [--shared ../shared] [--devdata .devdata/tok]
      copy the inputs this script needs from shared/ into a git-ignored folder (for the GPU machine)
  python3 tools/make_tokenizer_fixtures.py selftest [--shared DIR]
      pure-Python checks only (corpus builder, GGUF reader, SentencePiece protobuf reader, FNV)
  python3 tools/make_tokenizer_fixtures.py build --shared DIR --out tests/fixtures/tokenizers
      build every fixture (needs sentencepiece, tiktoken, tokenizers, transformers)

The references are the real reference implementations (sentencepiece, tiktoken, HF tokenizers /
transformers); nothing here re-implements a tokenizer.  Output, per tokenizer NAME:
  OUT/NAME.json            fixture (format below), OUT/json/<name>/tokenizer.json (+ tokenizer_config.json)
                           for the small trained / converted tokenizer.json files, OUT/report.json (diagnostics).

CORPUS RULE (the C++ test rebuilds the corpus from shared/bionlp with exactly this rule):
  Reading a file: bytes decoded as strict UTF-8; split on '\\n'; from each line remove ONE trailing '\\r'
  if present.  A line is "blank" if it is empty after stripping ASCII whitespace (space, \\t, \\n, \\v, \\f, \\r).
  Texts, in this order:
  a. for F in BC5CDR-chem/sample200.tsv, NCBI-disease/sample200.tsv: a sentence is a maximal run of
     non-blank lines (blank lines separate sentences; a run is also closed by end of file); its text is
     the first '\\t'-separated field of each line of the run, joined with single spaces ' '.
  b. for (F, columns) in ChemProt/sample200.tsv (1), DDI2013/sample200.tsv (1), HoC/sample200.tsv (1),
     LitCovid/sample200.tsv (1), PubMedQA/sample200.tsv (0, 1, 8): skip the first line (header); skip lines
     that are empty (length 0 after the '\\r' removal); split the line on '\\t' with NO quote processing;
     for each listed column c, in the listed order, if c < number of fields and field c is non-empty, the
     raw field is a text.  (Per row: column 0, then 1, then 8 for PubMedQA.)
  c. MedQA/test.jsonl: every line that is not blank is parsed as JSON; text = question + "\\n" +
     "\\n".join(k + ". " + options[k] for k in sorted(options keys, by code point)).
  Then the edge cases (EDGE_CASES below, also written into each fixture) follow the corpus.
  Each fixture entry stores sha = first 16 hex digits of sha256(UTF-8 bytes of the text).

FIXTURE FORMAT (one JSON per tokenizer):
  {"name", "source" (relative to shared/ or to tests/fixtures/tokenizers/), "kind", "reference", "modes":
   {"special": rule, "plain": rule}, "corpus_count": N, "edge_cases": [texts],
   "entries": [{"sha", "special": [n_ids, fnv], "plain": [n_ids, fnv], "roundtrip": bool}, ...]
              (corpus texts in order, then the edge cases),
   "full": {"<entry index>": {"special": [ids], "plain": [ids]}}  (every edge case + first 50 corpus texts),
   plus informational keys (bos_id, eos_id, notes, ...)}
  fnv = FNV-1a 64 over the ids as consecutive little-endian uint32 bytes (offset 0xcbf29ce484222325,
  prime 0x100000001b3), 16 lower-case hex digits.  roundtrip = (reference decode of the plain ids == text).
"""

import argparse
import base64
import hashlib
import json
import os
import shutil
import struct
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

N_FULL_CORPUS = 50
ASCII_WS = " \t\n\r\v\f"

# ----------------------------------------------------------------------------------------------
# corpus
# ----------------------------------------------------------------------------------------------


def read_lines(path):
    with open(path, "rb") as f:
        data = f.read().decode("utf-8")  # strict
    lines = data.split("\n")
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def is_blank(line):
    return line.strip(ASCII_WS) == ""


def conll_texts(path):
    out, cur = [], []
    for ln in read_lines(path):
        if is_blank(ln):
            if cur:
                out.append(" ".join(cur))
                cur = []
        else:
            cur.append(ln.split("\t")[0])
    if cur:
        out.append(" ".join(cur))
    return out


def tsv_texts(path, cols):
    out = []
    for ln in read_lines(path)[1:]:
        if ln == "":
            continue
        f = ln.split("\t")
        for c in cols:
            if c < len(f) and f[c] != "":
                out.append(f[c])
    return out


def medqa_texts(path):
    out = []
    for ln in read_lines(path):
        if is_blank(ln):
            continue
        r = json.loads(ln)
        opts = r["options"]
        out.append(r["question"] + "\n" + "\n".join(f"{k}. {opts[k]}" for k in sorted(opts)))
    return out


CONLL_FILES = ["BC5CDR-chem/sample200.tsv", "NCBI-disease/sample200.tsv"]
TSV_FILES = [("ChemProt/sample200.tsv", (1,)), ("DDI2013/sample200.tsv", (1,)), ("HoC/sample200.tsv", (1,)),
             ("LitCovid/sample200.tsv", (1,)), ("PubMedQA/sample200.tsv", (0, 1, 8))]
MEDQA_FILE = "MedQA/test.jsonl"


def build_corpus(bionlp_dir):
    """Returns (texts, sources) where sources[i] = 'file#k' (k = k-th text taken from that file)."""
    texts, sources = [], []

    def add(name, ts):
        for k, t in enumerate(ts):
            texts.append(t)
            sources.append(f"{name}#{k}")

    for f in CONLL_FILES:
        add(f, conll_texts(os.path.join(bionlp_dir, f)))
    for f, cols in TSV_FILES:
        add(f, tsv_texts(os.path.join(bionlp_dir, f), cols))
    add(MEDQA_FILE, medqa_texts(os.path.join(bionlp_dir, MEDQA_FILE)))
    return texts, sources


LONG_WORD = ("hydroxychloroquine" * 20)[:300]

EDGE_CASES = [
    "",
    " ",
    "   ",
    "a   b",
    "\t\t",
    " \n \n",
    "  leading spaces",
    "trailing spaces   ",
    "  both sides  ",
    "\ttab\tseparated\tvalues\t",
    "line1\nline2\r\nline3\rline4",
    "\r\n\r\n\r\n",
    "\n\n\nthree newlines then text",
    "text ending with newline\n",
    "    4 spaces indent\n        8 spaces indent",
    "Hello world",
    " Hello world",
    "I \u2764\ufe0f \U0001F9EC research \U0001F600\U0001F44D\U0001F3FD",
    "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466 family, \U0001F469\U0001F3FD\u200d\U0001F52C scientist",
    "\U0001F1FA\U0001F1F8\U0001F1EC\U0001F1E7\U0001F1EF\U0001F1F5 \U0001F3F3\ufe0f\u200d\U0001F308 flags",
    "\u86cb\u767d\u8d28\u7ec4\u5b66\u7814\u7a76 (proteomics) \u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8\uc640 \ub2e8\ubc31\uc9c8",
    "e\u0301 vs \u00e9 (decomposed vs composed)",
    "Cafe\u0301 cafe\u0301 caf\u00e9 CAF\u00c9",
    "A\u030a vs \u00c5 vs \u212b (angstrom)",
    "\u03b1-synuclein aggregation, \u03b22-adrenergic receptor, TNF-\u03b1 and IFN-\u03b3",
    "5 \u00b5g/mL \u00b1 0.2 (micro sign) vs 5 \u03bcg/mL (greek mu)",
    "\u2265 38.5 \u00b0C and \u2264 40 \u00b0C; 3 \u00d7 10\u2079/L \u2192 5\u2030",
    LONG_WORD,
    "12345678901234567890",
    "3.14159265358979",
    "don't I'LL they've we're she'd it's YOU'RE 'tis",
    "<s>",
    "</s>",
    "<s> [INST] What is IL-6? [/INST]",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>",
    "<|im_start|>user\nHello<|im_end|>",
    "<|endoftext|>",
    "[INST]",
    "<unk> <pad> <|user|> <|assistant|> <|end|> <|system|>",
    "text<s>glued</s>text",
    "see [REFERENCE_DOC_3] and[REFERENCE_DOC_12]x",
    "<0x41> <0x0A> byte-piece lookalikes",
    "\u0627\u0644\u0628\u0631\u0648\u062a\u064a\u0646 \u0627\u0644\u0633\u0643\u0631\u064a \u0641\u064a \u0627\u0644\u062f\u0645",
    "\u092a\u094d\u0930\u094b\u091f\u0940\u0928 \u0914\u0930 \u0921\u0940\u090f\u0928\u090f \u0905\u0928\u0941\u0915\u094d\u0930\u092e\u0923",
    "\u0411\u0435\u043b\u043e\u043a \u0438 \u0414\u041d\u041a \u0441\u0435\u043a\u0432\u0435\u043d\u0438\u0440\u043e\u0432\u0430\u043d\u0438\u0435",
    "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2 \u0e20\u0e32\u0e29\u0e32\u0e44\u0e17\u0e22",
    "https://pubmed.ncbi.nlm.nih.gov/12345678/?term=IL-6&sort=date#results",
    "def f(x):\n    return x**2  # square\n\tif (a != b) { c++; }",
    "IL-6/STAT3 and JAK1/2 signaling (p<0.05, n=12)",
    "\ufffd replacement \ufffd\ufffd chars",
    "\ue000\uf8ff private \U000f0000 use",
    "\u00a0non-breaking\u00a0space, thin\u2009space, ideographic\u3000space",
    "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom",
    "\ufb01 ligature \uff26\uff35\uff2c\uff2c\uff37\uff29\uff24\uff34\uff28 \u2460 \u00b2 \u00bd \u2126",
    "\U0001D518\U0001D52B\U0001D526\U0001D520\U0001D52C\U0001D521\U0001D522 \U0001D401\U0001D428\U0001D425\U0001D41D",
    "!!!!!!??????...... ------=======",
    "'''''' ``````` \"\"\"\"",
    "UPPER lower MiXeD cAsE",
    "line\u2028separator\u2029paragraph\u0085next",
    "bell\x07 escape\x1b[0m del\x7f",
    "\U0001F999",
    "a",
    ".",
    "\n",
    "C\u1eeda Vi\u1ec7t",
    "ied 4 \u00bd months F\u00fchrer",
    "Hello, y'all! How are you \U0001F601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e",
]

# ----------------------------------------------------------------------------------------------
# hashing
# ----------------------------------------------------------------------------------------------

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK64 = 0xFFFFFFFFFFFFFFFF


def fnv1a64_bytes(data):
    h = FNV_OFFSET
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & MASK64
    return h


def fnv_ids(ids):
    return f"{fnv1a64_bytes(struct.pack(f'<{len(ids)}I', *ids)):016x}"


def sha16(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# GGUF v3 metadata reader (pure Python; format: shared/docs/formats.md section 2)
# ----------------------------------------------------------------------------------------------

_GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}


def read_gguf_metadata(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version != 3:
        raise ValueError(f"{path}: GGUF version {version}, expected 3")
    pos = 24

    def rstr():
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        s = data[pos:pos + n]
        pos += n
        return s.decode("utf-8")

    def rval(t):
        nonlocal pos
        if t == 8:
            return rstr()
        if t == 9:
            et, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if et in _GGUF_SCALAR:
                fmt = _GGUF_SCALAR[et]
                size = struct.calcsize(fmt)
                vals = list(struct.unpack_from(f"<{n}{fmt}", data, pos))
                pos += n * size
                if et == 7:
                    vals = [bool(v) for v in vals]
                return vals
            return [rval(et) for _ in range(n)]
        if t in _GGUF_SCALAR:
            fmt = _GGUF_SCALAR[t]
            (v,) = struct.unpack_from("<" + fmt, data, pos)
            pos += struct.calcsize(fmt)
            return bool(v) if t == 7 else v
        raise ValueError(f"{path}: unknown GGUF value type {t}")

    kv = {}
    for _ in range(n_kv):
        key = rstr()
        (t,) = struct.unpack_from("<I", data, pos)
        pos += 4
        kv[key] = rval(t)
    return {"version": version, "n_tensors": n_tensors, "kv": kv}


GGUF_TOKENIZER_KEYS = ["model", "pre", "tokens", "scores", "token_type", "merges", "bos_token_id", "eos_token_id",
                       "add_bos_token", "add_eos_token"]


def gguf_tokenizer(path):
    md = read_gguf_metadata(path)
    kv = md["kv"]
    out = {k: kv.get("tokenizer.ggml." + k) for k in GGUF_TOKENIZER_KEYS}
    out["_other_keys"] = sorted(k for k in kv if not k.startswith("tokenizer.ggml."))
    out["_general"] = {k: v for k, v in kv.items() if k.startswith("general.") and not isinstance(v, list)}
    return out


# ----------------------------------------------------------------------------------------------
# SentencePiece ModelProto reader (pure Python protobuf wire format; only the fields we report)
# ----------------------------------------------------------------------------------------------


def _varint(buf, pos):
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def pb_fields(buf):
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        fn, wt = key >> 3, key & 7
        if wt == 0:
            v, pos = _varint(buf, pos)
        elif wt == 1:
            v = buf[pos:pos + 8]
            pos += 8
        elif wt == 2:
            n, pos = _varint(buf, pos)
            v = buf[pos:pos + n]
            pos += n
        elif wt == 5:
            v = buf[pos:pos + 4]
            pos += 4
        else:
            raise ValueError(f"protobuf wire type {wt}")
        yield fn, wt, v


SPM_TYPES = {1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED", 6: "BYTE"}
SPM_MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}
# TrainerSpec field numbers (sentencepiece_model.proto)
TRAINER_FIELDS = {3: "model_type", 4: "vocab_size", 21: "split_by_unicode_script", 22: "split_by_whitespace",
                  23: "split_by_number", 24: "treat_whitespace_as_suffix", 25: "split_digits",
                  26: "allow_whitespace_only_pieces", 35: "byte_fallback", 40: "unk_id", 41: "bos_id",
                  42: "eos_id", 43: "pad_id", 45: "unk_piece", 46: "bos_piece", 47: "eos_piece", 48: "pad_piece",
                  44: "unk_surface", 10: "character_coverage", 20: "max_sentencepiece_length",
                  31: "user_defined_symbols", 30: "control_symbols"}
NORMALIZER_FIELDS = {1: "name", 2: "precompiled_charsmap", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces",
                     5: "escape_whitespaces", 6: "normalization_rule_tsv"}


def read_spm_model(path):
    with open(path, "rb") as f:
        buf = f.read()
    pieces = []
    trainer = {}
    normalizer = {}
    denormalizer = None
    for fn, wt, v in pb_fields(buf):
        if fn == 1:
            p = {"piece": "", "score": 0.0, "type": 1}
            for f2, w2, v2 in pb_fields(v):
                if f2 == 1:
                    p["piece"] = v2.decode("utf-8")
                elif f2 == 2:
                    p["score"] = struct.unpack("<f", v2)[0]
                elif f2 == 3:
                    p["type"] = v2
            pieces.append(p)
        elif fn == 2:
            for f2, w2, v2 in pb_fields(v):
                name = TRAINER_FIELDS.get(f2)
                if name is None:
                    continue
                if w2 == 2:
                    v2 = v2.decode("utf-8", "replace")
                elif w2 == 5:
                    v2 = struct.unpack("<f", v2)[0]
                if w2 == 0 and v2 >= 1 << 63:
                    v2 -= 1 << 64  # negative int32 (e.g. pad_id = -1)
                if name in ("user_defined_symbols", "control_symbols"):
                    trainer[name + "_count"] = trainer.get(name + "_count", 0) + 1
                    if trainer[name + "_count"] <= 12:
                        trainer.setdefault(name + "_first", []).append(v2)
                else:
                    trainer[name] = v2
        elif fn == 3:
            for f2, w2, v2 in pb_fields(v):
                name = NORMALIZER_FIELDS.get(f2)
                if name == "precompiled_charsmap":
                    normalizer[name + "_bytes"] = len(v2)
                elif name in ("name", "normalization_rule_tsv"):
                    normalizer[name] = v2.decode("utf-8", "replace")
                elif name:
                    normalizer[name] = bool(v2)
        elif fn == 5:
            denormalizer = {}
            for f2, w2, v2 in pb_fields(v):
                name = NORMALIZER_FIELDS.get(f2)
                if name == "name":
                    denormalizer[name] = v2.decode("utf-8", "replace")
                elif name == "precompiled_charsmap":
                    denormalizer[name + "_bytes"] = len(v2)
    # proto2 defaults
    for k, d in (("add_dummy_prefix", True), ("remove_extra_whitespaces", True), ("escape_whitespaces", True)):
        normalizer.setdefault(k, d)
    if "model_type" in trainer:
        trainer["model_type"] = SPM_MODEL_TYPES.get(trainer["model_type"], trainer["model_type"])
    type_counts = {}
    for p in pieces:
        t = SPM_TYPES.get(p["type"], str(p["type"]))
        type_counts[t] = type_counts.get(t, 0) + 1
    special_pieces = {i: (p["piece"], SPM_TYPES.get(p["type"])) for i, p in enumerate(pieces)
                      if p["type"] in (2, 3, 4)}
    return {"pieces": pieces, "trainer_spec": trainer, "normalizer_spec": normalizer,
            "denormalizer_spec": denormalizer, "type_counts": type_counts, "special_pieces": special_pieces}


# ----------------------------------------------------------------------------------------------
# llama.cpp golden tests (models/ggml-vocab-*.gguf.inp/.out, produced by llama.cpp's
# convert_hf_to_gguf_update.py with the ORIGINAL HF tokenizer: tokenizer.encode(text, add_special_tokens=False)).
# Used only as an extra cross-check of the GGUF-built references; .out versions:
#   llama-spm @17f2243d, phi-3 and deepseek-llm @2f9a36a4, gpt-2 @492f75ce (ggerganov/llama.cpp).
# ----------------------------------------------------------------------------------------------

LC_EMOJI = "\U0001F680 (normal) \U0001F636\u200d\U0001F32B\ufe0f (multiple emojis concatenated) \u2705"
LC_KHMER = "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
LC_CHKTXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n" + LC_EMOJI +
             " \U0001F999\U0001F999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 " + LC_KHMER +
             "\U0001F601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
             "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
             "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll "
             "make it, 'D you like some tea? We'Ve a'lL")
LC_HEAD = ["ied 4 \u00bd months", "F\u00fchrer", "", " ", "  ", "   ", "\t", "\n", "\n\n", "\n\n\n", "\t\n",
           "Hello world", " Hello world", "Hello World", " Hello World", " Hello World!", "Hello, world!",
           " Hello, world!", " this is \U0001F999.cpp", "w048 7tuijk dsdfhu",
           "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438",
           LC_KHMER + "\u1781\u179b\u1785\u17c1\u1789",
           LC_EMOJI + " (only emoji that has its own token)",
           "Hello", " Hello", "  Hello", "   Hello", "    Hello", "    Hello\n    Hello", " (", "\n =", "' era",
           "Hello, y'all! How are you \U0001F601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e"]
LC_THREES = ["3" * k for k in range(1, 10)]
LC_TESTS = {
    # name: list of texts (None = text unknown, line skipped)
    "llama-spm": LC_HEAD + LC_THREES + [LC_CHKTXT],
    "phi-3": LC_HEAD + ["!!!!!!"] + LC_THREES + ["C\u1eeda Vi\u1ec7t", " discards", LC_CHKTXT],
    "deepseek-llm": LC_HEAD + ["!!!!!!"] + LC_THREES + ["C\u1eeda Vi\u1ec7t", " discards", LC_CHKTXT],
    "gpt-2": LC_HEAD + LC_THREES + [None, LC_CHKTXT],
}
LC_OUT = {
    "llama-spm": """
 474 287 29871 29946 29871 30226 7378
 383 4000 261

 259
 1678
 268
 29871 12
 29871 13
 29871 13 13
 29871 13 13 13
 29871 12 13
 15043 3186
 29871 15043 3186
 15043 2787
 29871 15043 2787
 29871 15043 2787 29991
 15043 29892 3186 29991
 29871 15043 29892 3186 29991
 29871 445 338 29871 243 162 169 156 29889 8223
 281 29900 29946 29947 29871 29955 9161 13535 18031 2176 6905
 1538 4851 665 1386 29713 1305
 29871 31849 31324 31934 228 162 142 228 161 146 228 162 133 228 161 153 228 161 186 31708 228 162 132 31708 228 161 165 31324 228 161 136 228 161 132 228 161 158 228 161 136 228 162 132 228 161 140
 29871 243 162 157 131 313 8945 29897 29871 243 162 155 185 30722 243 162 143 174 30598 313 20787 953 3848 275 16125 630 29897 29871 31681 313 6194 953 29877 2397 393 756 967 1914 5993 29897
 15043
 29871 15043
 259 15043
 1678 15043
 268 15043
 268 15043 13 1678 15043
 29871 313
 29871 13 353
 525 3152
 15043 29892 343 29915 497 29991 1128 526 366 29871 243 162 155 132 1577 30672 31522 30505 11548 31041 30732 29896 29941 29896 29946 29896 29945 29896 30408 30739
 29871 29941
 29871 29941 29941
 29871 29941 29941 29941
 29871 29941 29941 29941 29941
 29871 29941 29941 29941 29941 29941
 29871 29941 29941 29941 29941 29941 29941
 29871 29941 29941 29941 29941 29941 29941 29941
 29871 29941 29941 29941 29941 29941 29941 29941 29941
 29871 29941 29941 29941 29941 29941 29941 29941 29941 29941
 29871 13 29871 13 13 29871 13 13 13 29871 12 29871 12 12 29871 12 13 259 13 1678 13 268 13 418 13 243 162 157 131 313 8945 29897 29871 243 162 155 185 30722 243 162 143 174 30598 313 20787 953 3848 275 16125 630 29897 29871 31681 29871 243 162 169 156 243 162 169 156 29871 29941 29871 29941 29941 29871 29941 29941 29941 29871 29941 29941 29941 29941 29871 29941 29941 29941 29941 29941 29871 29941 29941 29941 29941 29941 29941 29871 29941 29941 29941 29941 29941 29941 29941 29871 29941 29941 29941 29941 29941 29941 29941 29941 29871 29941 29889 29941 29871 29941 636 29941 29871 29941 856 29941 29871 31849 31324 31934 228 162 142 228 161 146 228 162 133 228 161 153 228 161 186 31708 228 162 132 31708 228 161 165 31324 228 161 136 243 162 155 132 1577 30672 31522 30505 11548 31041 30732 29896 29941 29896 29946 29896 29945 29896 30408 30739 448 23648 2751 25512 1538 4851 665 1386 29713 1305 14550 4907 11120 16159 16159 16159 15945 15945 3045 636 6824 6824 6824 8773 8773 8773 306 29915 345 1063 525 29873 1025 540 29915 29879 727 29892 525 1525 366 1854 29973 525 29924 451 1854 306 29915 645 1207 372 29892 525 29928 366 763 777 23429 29973 1334 29915 29963 29872 263 29915 29880 29931
""",
    "phi-3": """
 474 287 29871 29946 29871 30226 7378
 383 4000 261

 259
 1678
 268
 29871 12
 29871 13
 29871 13 13
 29871 13 13 13
 29871 12 13
 15043 3186
 29871 15043 3186
 15043 2787
 29871 15043 2787
 29871 15043 2787 29991
 15043 29892 3186 29991
 29871 15043 29892 3186 29991
 29871 445 338 29871 243 162 169 156 29889 8223
 281 29900 29946 29947 29871 29955 9161 13535 18031 2176 6905
 1538 4851 665 1386 29713 1305
 29871 31849 31324 31934 228 162 142 228 161 146 228 162 133 228 161 153 228 161 186 31708 228 162 132 31708 228 161 165 31324 228 161 136 228 161 132 228 161 158 228 161 136 228 162 132 228 161 140
 29871 243 162 157 131 313 8945 29897 29871 243 162 155 185 30722 243 162 143 174 30598 313 20787 953 3848 275 16125 630 29897 29871 31681 313 6194 953 29877 2397 393 756 967 1914 5993 29897
 15043
 29871 15043
 259 15043
 1678 15043
 268 15043
 268 15043 13 1678 15043
 29871 313
 29871 13 353
 525 3152
 15043 29892 343 29915 497 29991 1128 526 366 29871 243 162 155 132 1577 30672 31522 30505 11548 31041 30732 29896 29941 29896 29946 29896 29945 29896 30408 30739
 1738 6824 21004
 29871 29941
 29871 29941 29941
 29871 29941 29941 29941
 29871 29941 29941 29941 29941
 29871 29941 29941 29941 29941 29941
 29871 29941 29941 29941 29941 29941 29941
 29871 29941 29941 29941 29941 29941 29941 29941
 29871 29941 29941 29941 29941 29941 29941 29941 29941
 29871 29941 29941 29941 29941 29941 29941 29941 29941 29941
 315 228 190 176 29874 10630 30529 29873
 29871 2313 3163
 29871 13 29871 13 13 29871 13 13 13 29871 12 29871 12 12 29871 12 13 259 13 1678 13 268 13 418 13 243 162 157 131 313 8945 29897 29871 243 162 155 185 30722 243 162 143 174 30598 313 20787 953 3848 275 16125 630 29897 29871 31681 29871 243 162 169 156 243 162 169 156 29871 29941 29871 29941 29941 29871 29941 29941 29941 29871 29941 29941 29941 29941 29871 29941 29941 29941 29941 29941 29871 29941 29941 29941 29941 29941 29941 29871 29941 29941 29941 29941 29941 29941 29941 29871 29941 29941 29941 29941 29941 29941 29941 29941 29871 29941 29889 29941 29871 29941 636 29941 29871 29941 856 29941 29871 31849 31324 31934 228 162 142 228 161 146 228 162 133 228 161 153 228 161 186 31708 228 162 132 31708 228 161 165 31324 228 161 136 243 162 155 132 1577 30672 31522 30505 11548 31041 30732 29896 29941 29896 29946 29896 29945 29896 30408 30739 448 23648 2751 25512 1538 4851 665 1386 29713 1305 14550 4907 11120 16159 16159 16159 15945 15945 3045 636 6824 6824 6824 8773 8773 8773 306 29915 345 1063 525 29873 1025 540 29915 29879 727 29892 525 1525 366 1854 29973 525 29924 451 1854 306 29915 645 1207 372 29892 525 29928 366 763 777 23429 29973 1334 29915 29963 29872 263 29915 29880 29931
""",
    "deepseek-llm": """
 1052 207 19 207 19109 4223
 37 100014 71 6245

 207
 243
 300
 184
 185
 185 185
 185 185 185
 184 185
 17464 1843
 37727 1843
 17464 5427
 37727 5427
 37727 5427 0
 17464 11 1843 0
 37727 11 1843 0
 437 317 12356 99 234 13 14743
 86 15 19 23 207 22 83 3970 27519 26016 3944 14025
 1603 6476 620 91754
 71374 209 71374 114 71374 228 155 240 220 71374 224 155 240 211 71374 231 71374 115 71374 240 155 240 210 71374 240 71374 95 71374 114 71374 214 71374 210 71374 236 71374 214 155 240 210 71374 218
 10044 95300 334 8754 8 33701 114 350 222 10044 221 104 46713 334 34732 996 24250 262 80923 8 207 37103 214 334 5956 89213 344 643 895 1377 10728 8
 17464
 37727
 207 37727
 243 37727
 300 37727
 300 37727 185 300 37727
 334
 185 403
 6 2906
 17464 11 320 6 436 0 1724 418 340 33701 210 3025 19017 612 9407 2681 16 18 16 19 16 20 16 1398 68940 239
 15278 3033
 18
 18 18
 18 18 18
 18 18 18 18
 18 18 18 18 18
 18 18 18 18 18 18
 18 18 18 18 18 18 18
 18 18 18 18 18 18 18 18
 18 18 18 18 18 18 18 18 18
 34 32555 242 64 23708 32555 216 83
 1763 2550
 185 207 185 185 207 185 185 185 207 11969 486 22504 185 243 185 300 185 251 185 663 185 10044 95300 334 8754 8 33701 114 350 222 10044 221 104 46713 334 34732 996 24250 262 80923 8 207 37103 214 12356 99 234 10044 99 234 207 18 207 18 18 207 18 18 18 207 18 18 18 18 207 18 18 18 18 18 207 18 18 18 18 18 18 207 18 18 18 18 18 18 18 207 18 18 18 18 18 18 18 18 207 18 13 18 207 18 526 18 207 18 1204 18 207 71374 209 71374 114 71374 228 155 240 220 71374 224 155 240 211 71374 231 71374 115 71374 240 155 240 210 71374 240 71374 95 71374 114 71374 214 71899 210 3025 19017 612 9407 2681 16 18 16 19 16 20 16 1398 68940 239 78827 55170 76659 620 91754 31116 36804 4885 4885 10897 4390 4390 41047 15278 3033 14986 5675 304 6 313 803 655 33326 362 6 82 745 11 655 1374 340 2049 30 655 44 441 2049 304 6 647 1099 359 11 655 35 340 837 742 10842 30 1003 6 10699 245 6 75 43
""",
    "gpt-2": """
 798 604 25208 1933
 37 9116 71 11751

 220
 220 220
 220 220 220
 197
 198
 628
 628 198
 197 198
 15496 995
 18435 995
 15496 2159
 18435 2159
 18435 2159 0
 15496 11 995 0
 18435 11 995 0
 428 318 12520 99 247 13 20322
 86 47202 767 28047 45961 288 82 7568 13415
 22177 16843 141 231 15166 12466 121 16142 12466 239 141 232 30143 140 111 16142 21169 21727 31583 18849
 157 252 222 157 252 114 157 252 241 157 253 233 157 252 237 157 253 224 157 252 244 157 252 115 157 252 253 157 253 223 157 252 253 157 252 95 157 252 114 157 252 227 157 252 223 157 252 249 157 252 227 157 253 223 157 252 231
 8582 248 222 357 11265 8 30325 114 447 235 8582 234 104 37929 357 48101 795 13210 271 1673 36686 515 8 14519 227 357 8807 44805 326 468 663 898 11241 8
 15496
 18435
 220 18435
 220 220 18435
 220 220 220 18435
 220 220 220 18435 198 220 220 220 18435
 357
 198 796
 6 6980
 15496 11 331 6 439 0 1374 389 345 30325 223 5633 22755 239 46349 111 28839 101 18040 32432 98 43291 1485 1415 24309 25465 171 121 252
 18
 2091
 20370
 24840
 2091 20370
 24840 2091
 24840 20370
 24840 24840
 24840 2091 20370
 20046 94 960 168 226 250 168 248 116 168 245 238 168 226 250
 198 220 628 220 628 198 220 197 220 197 197 220 197 198 220 220 198 220 220 220 198 220 220 220 220 198 220 220 220 220 220 198 8582 248 222 357 11265 8 30325 114 447 235 8582 234 104 37929 357 48101 795 13210 271 1673 36686 515 8 14519 227 12520 99 247 8582 99 247 513 4747 23460 513 20370 23460 2091 23460 20370 23460 24840 23460 2091 20370 513 13 18 513 492 18 513 986 18 28053 252 222 157 252 114 157 252 241 157 253 233 157 252 237 157 253 224 157 252 244 157 252 115 157 252 253 157 253 223 157 252 253 157 252 95 157 252 114 157 252 227 47249 223 5633 22755 239 46349 111 28839 101 18040 32432 98 43291 1485 1415 24309 25465 171 121 252 40103 1421 18604 12466 121 16843 141 231 15166 12466 121 16142 12466 239 141 232 30143 140 111 16142 21169 21727 31583 18849 705 39115 6 33153 15506 63 15931 15931 16317 13896 3228 9805 3548 314 1053 587 705 44040 339 338 612 11 705 2200 345 1654 30 705 44 407 1654 314 1183 787 340 11 705 35 345 588 617 8887 30 775 6 26979 257 6 75 43
""",
}


def llamacpp_golden(name):
    lines = LC_OUT[name].split("\n")[1:-1]
    texts = LC_TESTS[name]
    if len(lines) != len(texts):
        raise ValueError(f"golden {name}: {len(lines)} .out lines vs {len(texts)} texts")
    return [(t, [int(x) for x in ln.split()]) for t, ln in zip(texts, lines) if t is not None]


# ----------------------------------------------------------------------------------------------
# pre-tokenizer regexes
# ----------------------------------------------------------------------------------------------

LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")

# DeepSeek-LLM (deepseek-ai/deepseek-llm-7b-base tokenizer.json; llama.cpp LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM).
# The letter class is the set of cased letters (Lu/Ll/Lt ranges).  It is written here with explicit code
# points because six of its characters are canonical singletons that NFC-normalising copies (llama.cpp's
# source among them) silently change: U+1F7D, U+1FBE, U+1FD3, U+1FDB, U+2126, U+212A.
_DS_LETTER_RANGES = [
    (0x41, 0x5A), (0x61, 0x7A), (0xB5, 0xB5), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x1BA), (0x1BC, 0x1BF),
    (0x1C4, 0x293), (0x295, 0x2AF), (0x370, 0x373), (0x376, 0x377), (0x37B, 0x37D), (0x37F, 0x37F),
    (0x386, 0x386), (0x388, 0x38A), (0x38C, 0x38C), (0x38E, 0x3A1), (0x3A3, 0x3F5), (0x3F7, 0x481),
    (0x48A, 0x52F), (0x531, 0x556), (0x10A0, 0x10C5), (0x13A0, 0x13F5), (0x13F8, 0x13FD), (0x1C90, 0x1CBA),
    (0x1CBD, 0x1CBF), (0x1D00, 0x1D2B), (0x1D6B, 0x1D77), (0x1D79, 0x1D9A), (0x1E00, 0x1F15), (0x1F18, 0x1F1D),
    (0x1F20, 0x1F45), (0x1F48, 0x1F4D), (0x1F50, 0x1F57), (0x1F59, 0x1F59), (0x1F5B, 0x1F5B), (0x1F5D, 0x1F5D),
    (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4), (0x1FB6, 0x1FBC), (0x1FBE, 0x1FBE), (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC),
    (0x1FD0, 0x1FD3), (0x1FD6, 0x1FDB), (0x1FE0, 0x1FEC), (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC), (0x2102, 0x2102),
    (0x2107, 0x2107), (0x210A, 0x2113), (0x2115, 0x2115), (0x2119, 0x211D), (0x2124, 0x2124), (0x2126, 0x2126),
    (0x2128, 0x2128), (0x212A, 0x212D), (0x212F, 0x2134), (0x2139, 0x2139), (0x213C, 0x213F), (0x2145, 0x2149),
    (0x214E, 0x214E), (0x2183, 0x2184), (0x2C00, 0x2C7B), (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE), (0x2CF2, 0x2CF3),
    (0xA640, 0xA66D), (0xA680, 0xA69B), (0xA722, 0xA76F), (0xA771, 0xA787), (0xA78B, 0xA78E), (0xAB70, 0xABBF),
    (0xFB00, 0xFB06), (0xFB13, 0xFB17), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0x10400, 0x1044F),
    (0x104B0, 0x104D3), (0x104D8, 0x104FB), (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2), (0x118A0, 0x118DF),
    (0x1E900, 0x1E943),
]


def _cls(ranges):
    return "".join(chr(a) if a == b else chr(a) + "-" + chr(b) for a, b in ranges)


DEEPSEEK_LLM_SPLITS = [
    "[\r\n]",
    "\\s?[" + _cls(_DS_LETTER_RANGES) + "]+",
    "\\s?[" + _cls([(0x21, 0x2F), (0x3A, 0x7E), (0xFF01, 0xFF0F), (0xFF1A, 0xFF5E), (0x2018, 0x201F),
                    (0x3000, 0x3002)]) + "]+",
    "\\s+$",
    "[" + _cls([(0x4E00, 0x9FA5), (0x800, 0x4E00), (0xAC00, 0xD7FF)]) + "]+",
]
# then pre_tokenizers.Digits(individual_digits=True) (DeepSeek's tokenizer.json; llama.cpp writes "\p{N}+"
# instead, equivalent for this vocab, which has no multi-digit tokens: both variants are compared below)
DEEPSEEK_LLM_DIGITS_ALT = "\\p{N}+"

# ----------------------------------------------------------------------------------------------
# helpers for the build stage
# ----------------------------------------------------------------------------------------------

LOG = []


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)


def first_diff(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b)) if len(a) != len(b) else -1


def compare_lists(name, texts, got, want, limit=5):
    """Count texts whose id lists differ; log a few."""
    bad = []
    for i, (g, w) in enumerate(zip(got, want)):
        if list(g) != list(w):
            bad.append(i)
    if bad:
        log(f"  [{name}] {len(bad)}/{len(texts)} differ")
        for i in bad[:limit]:
            j = first_diff(got[i], want[i])
            log(f"    text#{i} {texts[i][:80]!r}: at {j}: got {list(got[i][max(0, j - 3):j + 5])} "
                f"want {list(want[i][max(0, j - 3):j + 5])}")
    else:
        log(f"  [{name}] all {len(texts)} agree")
    return bad


class Ref:
    """A reference: name, source, kind, reference (text), modes (rules), encode_special/encode_plain on lists,
    decode on one id list."""

    def __init__(self, name, source, kind, reference, modes, enc_special, enc_plain, decode, info=None):
        self.name, self.source, self.kind, self.reference, self.modes = name, source, kind, reference, modes
        self.enc_special, self.enc_plain, self.decode = enc_special, enc_plain, decode
        self.info = info or {}


def write_fixture(out_dir, ref, corpus, edges):
    texts = corpus + edges
    t0 = time.time()
    sp = [list(x) for x in ref.enc_special(texts)]
    pl = [list(x) for x in ref.enc_plain(texts)]
    entries = []
    full = {}
    n_rt = 0
    for i, t in enumerate(texts):
        try:
            rt = ref.decode(pl[i]) == t
        except Exception as e:  # noqa: BLE001
            log(f"  decode failed on text#{i}: {e}")
            rt = False
        n_rt += rt
        entries.append({"sha": sha16(t), "special": [len(sp[i]), fnv_ids(sp[i])],
                        "plain": [len(pl[i]), fnv_ids(pl[i])], "roundtrip": rt})
        if i < N_FULL_CORPUS or i >= len(corpus):
            full[str(i)] = {"special": sp[i], "plain": pl[i]}
    fx = {"name": ref.name, "source": ref.source, "kind": ref.kind, "reference": ref.reference, "modes": ref.modes,
          "corpus_count": len(corpus), "edge_cases": edges}
    fx.update(ref.info)
    fx["entries"] = entries
    fx["full"] = full
    path = os.path.join(out_dir, ref.name + ".json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(fx, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    n_tok = sum(len(x) for x in pl)
    n_bad_rt = len(texts) - n_rt
    bad_edges = [i - len(corpus) for i in range(len(corpus), len(texts)) if not entries[i]["roundtrip"]]
    bad_corpus = sum(1 for i in range(len(corpus)) if not entries[i]["roundtrip"])
    log(f"  wrote {path}: {len(texts)} entries, {n_tok} plain ids, roundtrip failures {n_bad_rt} "
        f"(corpus {bad_corpus}, edge idx {bad_edges}), {os.path.getsize(path)} bytes, {time.time() - t0:.1f}s")
    return {"plain_ids": pl, "special_ids": sp, "roundtrip_fail_corpus": bad_corpus, "roundtrip_fail_edges": bad_edges}


def bpe_merges_pairs(merges):
    out = []
    for m in merges:
        if isinstance(m, (list, tuple)):
            out.append(tuple(m))
            continue
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"merge {m!r} does not split into 2 parts")
        out.append((parts[0], parts[1]))
    return out


# ----------------------------------------------------------------------------------------------
# reference builders
# ----------------------------------------------------------------------------------------------


def spm_ref(name, shared, rel, report, bos_rule=True, source=None):
    import sentencepiece as spm
    path = os.path.join(shared, rel)
    sp = spm.SentencePieceProcessor(model_file=path)
    meta = read_spm_model(path)
    bos = sp.bos_id()
    eos = sp.eos_id()
    info = {"bos_id": bos, "eos_id": eos, "unk_id": sp.unk_id(), "vocab_size": sp.get_piece_size(),
            "normalizer_spec": meta["normalizer_spec"], "trainer_spec": meta["trainer_spec"],
            "piece_type_counts": meta["type_counts"],
            "special_pieces_first": {str(k): v for k, v in list(meta["special_pieces"].items())[:12]}}
    report[name] = {"spm": info, "denormalizer_spec": meta["denormalizer_spec"]}
    log(f"  {name}: vocab {sp.get_piece_size()} bos {bos} eos {eos} unk {sp.unk_id()} "
        f"normalizer {meta['normalizer_spec']} trainer {meta['trainer_spec']} types {meta['type_counts']}")
    # sanity: our protobuf reader agrees with sentencepiece on pieces and scores
    assert len(meta["pieces"]) == sp.get_piece_size()
    for i in range(sp.get_piece_size()):
        p = meta["pieces"][i]
        if p["piece"] != sp.id_to_piece(i) or abs(p["score"] - sp.get_score(i)) > 1e-6:
            raise AssertionError(f"protobuf reader disagrees with sentencepiece at id {i}")
    add_bos = bos_rule
    modes = {"special": (f"[bos_id={bos}] + sp.encode(text)" if add_bos else "sp.encode(text)") +
             "; special-token text (<s>, </s>, [INST], ...) is NOT recognised: sentencepiece never matches "
             "CONTROL pieces in input text (USER_DEFINED pieces, if any, are matched in both modes); no EOS",
             "plain": "sp.encode(text)  (SentencePieceProcessor defaults: no bos/eos, no sampling)"}

    def enc_plain(texts):
        return sp.encode(texts)

    def enc_special(texts):
        return [([bos] if add_bos else []) + x for x in sp.encode(texts)]

    ref = Ref(name, source or rel, "sentencepiece",
              f"sentencepiece {spm.__version__} SentencePieceProcessor(model_file=...); decode = sp.decode(ids)",
              modes, enc_special, enc_plain, lambda ids: sp.decode(ids), info)
    ref.sp = sp
    return ref


def spm_vocab_merges_by_score(meta):
    """vocab {piece: id} and BPE merges for a SentencePiece BPE model, ordered like transformers 4.x's
    SentencePieceExtractor.extract(vocab_scores): every NORMAL piece p yields merges (p[:k], p[k:]) for the splits
    whose halves are in the vocab (sorted by (id(left), id(right))); all merges are then sorted by the score of p,
    descending (stable)."""
    pieces = meta["pieces"]
    vocab = {p["piece"]: i for i, p in enumerate(pieces)}
    merges = []
    for p in pieces:
        if p["type"] != 1:
            continue
        s = p["piece"]
        local = [(s[:k], s[k:]) for k in range(1, len(s)) if s[:k] in vocab and s[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((lt, rt, p["score"]) for lt, rt in local)
    merges.sort(key=lambda x: -x[2])
    return vocab, [(lt, rt) for lt, rt, _ in merges]


def load_tiktoken_ranks(path):
    ranks = {}
    with open(path, "rb") as f:
        for ln in f.read().splitlines():
            if not ln:
                continue
            tok, r = ln.split()
            ranks[base64.b64decode(tok)] = int(r)
    return ranks


def llama3_specials(shared):
    with open(os.path.join(shared, "tokenizers/llama3/tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    return {v["content"]: int(k) for k, v in cfg["added_tokens_decoder"].items()}


def tiktoken_ref(shared, report):
    import tiktoken
    path = os.path.join(shared, "tokenizers/llama3/tokenizer.model")
    ranks = load_tiktoken_ranks(path)
    specials = llama3_specials(shared)
    enc = tiktoken.Encoding(name="llama3", pat_str=LLAMA3_PAT, mergeable_ranks=ranks, special_tokens=specials)
    bos = specials["<|begin_of_text|>"]
    info = {"bos_id": bos, "eos_id": specials["<|end_of_text|>"], "eot_id": specials["<|eot_id|>"],
            "n_vocab": enc.n_vocab, "pattern": LLAMA3_PAT, "n_special_tokens": len(specials),
            "special_tokens": {k: v for k, v in sorted(specials.items(), key=lambda kv: kv[1])}}
    report["llama3"] = {"n_ranks": len(ranks), "n_specials": len(specials)}
    log(f"  llama3: {len(ranks)} ranks, {len(specials)} specials, n_vocab {enc.n_vocab}")
    modes = {"special": f"[{bos}] + enc.encode(text, allowed_special='all')  (the 256 special tokens of "
                        "tokenizer_config.json added_tokens_decoder are recognised in the text; no EOS)",
             "plain": "enc.encode(text, disallowed_special=())  (special-token text encoded as ordinary text)"}
    ref = Ref("llama3", "tokenizers/llama3/tokenizer.model", "tiktoken",
              f"tiktoken {tiktoken.__version__} Encoding(pat_str=Llama-3 pattern, mergeable_ranks=file, "
              "special_tokens=llama3/tokenizer_config.json added_tokens_decoder); decode = enc.decode(ids)",
              modes,
              lambda ts: [[bos] + enc.encode(t, allowed_special="all") for t in ts],
              lambda ts: [enc.encode(t, disallowed_special=()) for t in ts],
              lambda ids: enc.decode(ids), info)
    ref.enc = enc
    ref.specials = specials
    return ref


def hf_tokenizer_encode(tok, texts, add_special_tokens, split_special):
    prev = tok.encode_special_tokens
    tok.encode_special_tokens = split_special
    try:
        encs = tok.encode_batch(texts, add_special_tokens=add_special_tokens)
    finally:
        tok.encode_special_tokens = prev
    return [e.ids for e in encs]


def tiktoken_vs_hf(shared, tt, texts, report):
    """Cross-check tiktoken against transformers' TikTokenConverter."""
    from transformers.convert_slow_tokenizer import TikTokenConverter
    path = os.path.join(shared, "tokenizers/llama3/tokenizer.model")
    specials = [k for k, _ in sorted(tt.specials.items(), key=lambda kv: kv[1])]
    t0 = time.time()
    import inspect
    params = inspect.signature(TikTokenConverter.__init__).parameters
    kw = "extra_special_tokens" if "extra_special_tokens" in params else "additional_special_tokens"
    conv = TikTokenConverter(vocab_file=path, pattern=LLAMA3_PAT, **{kw: specials})
    hf = conv.converted()
    if hf.token_to_id("<|begin_of_text|>") != tt.specials["<|begin_of_text|>"]:
        from tokenizers import AddedToken
        log(f"  TikTokenConverter did not add the specials (kw {kw}); adding them")
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    assert hf.token_to_id("<|eot_id|>") == tt.specials["<|eot_id|>"]
    log(f"  TikTokenConverter built in {time.time() - t0:.1f}s, vocab {hf.get_vocab_size()}")
    bos = tt.specials["<|begin_of_text|>"]
    hp = hf_tokenizer_encode(hf, texts, False, True)
    hs = [[bos] + x for x in hf_tokenizer_encode(hf, texts, False, False)]
    bp = compare_lists("tiktoken vs HF TikTokenConverter, plain", texts, hp, tt.enc_plain(texts))
    bs = compare_lists("tiktoken vs HF TikTokenConverter, special", texts, hs, tt.enc_special(texts))
    report["llama3_vs_hf"] = {"plain_mismatch": len(bp), "special_mismatch": len(bs), "n": len(texts),
                              "hf_pre_tokenizer": json.loads(hf.to_str())["pre_tokenizer"]}


def gpt2files_ref(shared, report):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    import tokenizers
    d = os.path.join(shared, "tokenizers/llama3.2-gpt2format")
    with open(os.path.join(d, "encoder.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(d, "vocab.bpe"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    header = lines[0].startswith("#version")
    merges = bpe_merges_pairs([ln for ln in (lines[1:] if header else lines) if ln])
    hi = sorted(v for v in vocab.values() if v >= 128000)
    info = {"n_vocab": len(vocab), "max_id": max(vocab.values()), "n_merges": len(merges),
            "vocab_bpe_has_version_header": header, "encoder_json_ids_ge_128000": len(hi),
            "bos_id": None, "eos_id": None, "ignore_merges": True, "pattern": LLAMA3_PAT}
    report["llama3.2-gpt2format"] = dict(info)
    log(f"  gpt2format: {info}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PAT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok_nim = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok_nim.pre_tokenizer = tok.pre_tokenizer
    modes = {"special": "same as plain: encoder.json holds no id >= 128000, so the GPT-2 file pair defines no "
                        "special tokens and no BOS (use llama3.json for BOS/special behaviour)",
             "plain": "tok.encode(text, add_special_tokens=False).ids"}
    ref = Ref("llama3.2-gpt2format", "tokenizers/llama3.2-gpt2format/encoder.json+vocab.bpe", "gpt2-files",
              f"HF tokenizers {tokenizers.__version__}: models.BPE(vocab=encoder.json, merges=vocab.bpe (every line "
              "is a merge; no #version header), ignore_merges=True as in Llama 3's tokenizer.json, tiktoken and "
              "ollama), pre_tokenizer Sequence[Split(Llama-3 pattern, 'isolated'), ByteLevel(add_prefix_space=False, "
              "use_regex=False)], decoder ByteLevel",
              modes,
              lambda ts: hf_tokenizer_encode(tok, ts, False, False),
              lambda ts: hf_tokenizer_encode(tok, ts, False, False),
              lambda ids: tok.decode(ids, skip_special_tokens=False), info)
    ref.tok, ref.tok_nim = tok, tok_nim
    return ref


def hf_bpe_from_gguf(g, pre_tokenizer, report_key, report, special_types=(3,), user_types=(4,)):
    from tokenizers import AddedToken, Tokenizer, decoders, models
    tokens = g["tokens"]
    vocab = {}
    dups = []
    for i, t in enumerate(tokens):
        if t in vocab:
            dups.append((i, t))
            continue
        vocab[t] = i
    merges = bpe_merges_pairs(g["merges"])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    types = g["token_type"]
    added = []
    for i, t in enumerate(tokens):
        if types[i] in special_types:
            added.append(AddedToken(t, special=True, normalized=False))
        elif types[i] in user_types:
            added.append(AddedToken(t, special=False, normalized=False))
    specials = [a for a in added if a.special]
    users = [a for a in added if not a.special]
    tok.add_special_tokens(specials)
    tok.add_tokens(users)
    for a in added:
        assert tok.token_to_id(a.content) == vocab[a.content], a.content
    tcount = {}
    for t in types:
        tcount[t] = tcount.get(t, 0) + 1
    report[report_key]["token_type_counts"] = tcount
    report[report_key]["duplicates"] = dups[:20]
    report[report_key]["n_special_added"] = len(specials)
    report[report_key]["n_user_added"] = len(users)
    report[report_key]["special_added_first"] = [(vocab[a.content], a.content) for a in specials[:20]]
    report[report_key]["user_added"] = [(vocab[a.content], a.content) for a in users[:40]]
    log(f"  {report_key}: {len(tokens)} tokens, {len(merges)} merges, dups {len(dups)}, type counts {tcount}, "
        f"{len(specials)} special + {len(users)} user-defined added tokens")
    return tok


def gguf_summary(g):
    return {k: (v if not isinstance(v, list) else f"<{len(v)} items>") for k, v in g.items()
            if not k.startswith("_")} | {"general": g["_general"]}


def golden_check(name, ref, report):
    try:
        gold = llamacpp_golden(name)
    except Exception as e:  # noqa: BLE001
        log(f"  golden {name}: cannot parse: {e}")
        return
    texts = [t for t, _ in gold]
    got = ref.enc_plain(texts)
    bad = compare_lists(f"{ref.name} vs llama.cpp ggml-vocab-{name}.gguf.out (original HF tokenizer)",
                        texts, got, [w for _, w in gold], limit=10)
    report.setdefault("golden", {})[ref.name] = {"n": len(texts), "mismatch": bad}


def build_transformers_llama(shared, tmp, report):
    """Llama 2 SentencePiece -> transformers fast tokenizer. Tries a few routes, returns (tok, route, log)."""
    import transformers
    from transformers import AutoTokenizer
    src = os.path.join(shared, "tokenizers/llama2/tokenizer.model")
    routes = []
    d1 = os.path.join(tmp, "llama2-cfg")
    os.makedirs(d1, exist_ok=True)
    shutil.copy(src, os.path.join(d1, "tokenizer.model"))
    with open(os.path.join(d1, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}, f)
    routes.append(("AutoTokenizer.from_pretrained(dir holding tokenizer.model + tokenizer_config.json "
                   "{tokenizer_class: LlamaTokenizer, bos <s>, eos </s>, unk <unk>, add_bos_token true})",
                   lambda: AutoTokenizer.from_pretrained(d1)))
    d2 = os.path.join(tmp, "llama2-bare")
    os.makedirs(d2, exist_ok=True)
    shutil.copy(src, os.path.join(d2, "tokenizer.model"))
    routes.append(("AutoTokenizer.from_pretrained(dir holding tokenizer.model only)",
                   lambda: AutoTokenizer.from_pretrained(d2)))
    routes.append(("LlamaTokenizerFast(vocab_file=...)",
                   lambda: transformers.LlamaTokenizerFast(vocab_file=src)))
    out = []
    for desc, fn in routes:
        try:
            tok = fn()
            n = len(tok)
            out.append((desc, tok, n, fn))
            log(f"  transformers route {desc}: {type(tok).__name__} len {n}")
        except Exception as e:  # noqa: BLE001
            log(f"  transformers route {desc}: FAILED {type(e).__name__}: {e}")
    report["transformers_llama_routes"] = [(d, type(t).__name__, n) for d, t, n, _ in out]
    return out


def transformers_encode(tok, texts, split_special):
    """transformers encode without BOS/EOS; split_special=True treats special-token text as plain text.
    Falls back to the backend tokenizer if transformers ignores split_special_tokens."""
    bos = tok.convert_tokens_to_ids("<s>")
    try:
        probe = tok.encode("<s>", add_special_tokens=False, split_special_tokens=split_special)
        if (bos in probe) == split_special:
            raise TypeError(f"split_special_tokens={split_special} not honoured: {probe}")
        return [tok.encode(t, add_special_tokens=False, split_special_tokens=split_special) for t in texts], \
            "tok.encode(text, add_special_tokens=False, split_special_tokens=%s)" % split_special
    except TypeError as e:
        log(f"  transformers encode fallback to backend tokenizer: {e}")
        be = tok.backend_tokenizer
        return hf_tokenizer_encode(be, texts, False, split_special), \
            "tok.backend_tokenizer.encode(text, add_special_tokens=False) with encode_special_tokens=%s" % split_special


def train_json_tokenizers(corpus, out_json_dir, report):
    """Train the small tokenizer.json fixtures; returns {name: path}."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, \
        processors, trainers
    paths = {}
    VOCAB = 2000

    def save(name, tok, cfg):
        d = os.path.join(out_json_dir, name)
        os.makedirs(d, exist_ok=True)
        p = os.path.join(d, "tokenizer.json")
        tok.save(p)
        with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)
            f.write("\n")
        paths[name] = p
        log(f"  saved {p}: vocab {tok.get_vocab_size()} ({os.path.getsize(p)} bytes)")

    def set_model_flag(tok, key, value):
        j = json.loads(tok.to_str())
        j["model"][key] = value
        return Tokenizer.from_str(json.dumps(j))

    # --- byte-level family
    def bytelevel(pre, normalizer, specials):
        tok = Tokenizer(models.BPE())
        if normalizer is not None:
            tok.normalizer = normalizer
        tok.pre_tokenizer = pre
        tok.decoder = decoders.ByteLevel()
        tr = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=specials,
                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(corpus, trainer=tr)
        return tok

    sp3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tok = bytelevel(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PAT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), None, sp3)
    tok = set_model_flag(tok, "ignore_merges", True)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
        special_tokens=[("<|begin_of_text|>", bos)])
    save("bytelevel-llama3", tok, {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                                   "eos_token": "<|end_of_text|>", "add_bos_token": True, "add_eos_token": False})

    tok = bytelevel(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PAT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), normalizers.NFC(),
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    save("bytelevel-qwen2", tok, {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
                                  "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                                  "add_bos_token": False, "add_eos_token": False})

    tok = bytelevel(pre_tokenizers.ByteLevel(add_prefix_space=False), None, ["<|endoftext|>"])
    save("gpt2", tok, {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
                       "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "add_bos_token": False,
                       "add_eos_token": False})

    # --- SentencePiece-style BPE with byte fallback (trained once, saved with two front ends)
    tr_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tr_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    # deterministic alphabet: the 150 most frequent characters (ties by code point), with ' ' counted as U+2581;
    # passed as initial_alphabet with limit_alphabet=150 so the trainer's own (unstable) cut is never used
    cc = {}
    for t in corpus:
        for ch in t.replace(" ", "\u2581"):
            cc[ch] = cc.get(ch, 0) + 1
    cc["\u2581"] = cc.get("\u2581", 0) + len(corpus)
    alphabet = [c for c, _ in sorted(cc.items(), key=lambda kv: (-kv[1], ord(kv[0])))[:150]]
    tr = trainers.BpeTrainer(vocab_size=VOCAB - 256, min_frequency=2, special_tokens=["<unk>", "<s>", "</s>"],
                             initial_alphabet=alphabet, limit_alphabet=len(alphabet), show_progress=False)
    tr_tok.train_from_iterator(corpus, trainer=tr)
    j = json.loads(tr_tok.to_str())
    trained_vocab = sorted(j["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = bpe_merges_pairs(j["model"]["merges"])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = 3 + b
    for t, _ in trained_vocab:
        if t not in vocab:
            vocab[t] = len(vocab)
    report["spm_trained"] = {"vocab": len(vocab), "merges": len(merges)}

    def spm_front(name, legacy):
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                                   fuse_unk=True))
        if legacy:
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1, right=0)])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s>:1 $B:1",
                                                           special_tokens=[("<s>", 1)])
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
        save(name, tok, {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                         "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False})

    spm_front("spm-metaspace", False)
    spm_front("spm-legacy", True)
    return paths


def json_ref(name, path, rel, report, note=""):
    from tokenizers import Tokenizer
    import tokenizers
    tok = Tokenizer.from_file(path)
    j = json.loads(tok.to_str())
    info = {"vocab_size": tok.get_vocab_size(), "normalizer": j.get("normalizer"),
            "pre_tokenizer": j.get("pre_tokenizer"), "post_processor_type": (j.get("post_processor") or {}).get("type"),
            "decoder_type": (j.get("decoder") or {}).get("type"),
            "added_tokens": [(a["id"], a["content"], a["special"]) for a in j.get("added_tokens", [])][:20],
            "model_flags": {k: v for k, v in j["model"].items() if k not in ("vocab", "merges")}}
    report[name] = info
    modes = {"special": "tok.encode(text, add_special_tokens=True).ids  (post-processor template applied; "
                        "special added tokens in the text recognised)",
             "plain": "tok.encode(text, add_special_tokens=False).ids with tok.encode_special_tokens = True "
                      "(special-token text split as ordinary text; non-special added tokens still matched)"}
    return Ref(name, rel, "tokenizer.json",
               f"HF tokenizers {tokenizers.__version__} Tokenizer.from_file(...); decode = "
               f"tok.decode(ids, skip_special_tokens=False){note}", modes,
               lambda ts: hf_tokenizer_encode(tok, ts, True, False),
               lambda ts: hf_tokenizer_encode(tok, ts, False, True),
               lambda ids: tok.decode(ids, skip_special_tokens=False), info)


# ----------------------------------------------------------------------------------------------
# main build
# ----------------------------------------------------------------------------------------------


def build(shared, out_dir):
    versions = {}
    for mod in ("sentencepiece", "tiktoken", "tokenizers", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            versions[mod] = f"missing: {e}"
    log("versions", versions, "python", sys.version.split()[0])
    os.makedirs(out_dir, exist_ok=True)
    report = {"versions": versions, "errors": {}}
    corpus, sources = build_corpus(os.path.join(shared, "bionlp"))
    edges = list(EDGE_CASES)
    texts = corpus + edges
    counts = {}
    for s in sources:
        k = s.split("#")[0]
        counts[k] = counts.get(k, 0) + 1
    report["corpus"] = {"count": len(corpus), "per_file": counts, "edge_cases": len(edges),
                        "chars": sum(len(t) for t in corpus),
                        "sha256_of_shas": hashlib.sha256("".join(sha16(t) for t in corpus).encode()).hexdigest()}
    log("corpus", report["corpus"])
    results = {}
    tmp = os.path.join(out_dir, "..", "_tmp_tok")
    os.makedirs(tmp, exist_ok=True)

    def run(name, fn):
        log(f"== {name}")
        t0 = time.time()
        try:
            ref = fn()
            if ref is not None:
                results[ref.name] = write_fixture(out_dir, ref, corpus, edges)
                results[ref.name]["ref"] = ref
            log(f"== {name} done in {time.time() - t0:.1f}s")
            return ref
        except Exception as e:  # noqa: BLE001
            tb = traceback.format_exc()
            log(f"!! {name} FAILED: {e}\n{tb}")
            report["errors"][name] = tb
            return None

    # SentencePiece models
    spm_refs = {}
    for name, rel in (("llama2", "tokenizers/llama2/tokenizer.model"),
                      ("mistral-v1", "tokenizers/mistral/tokenizer.model.v1"),
                      ("mistral-v2", "tokenizers/mistral/mistral_instruct_tokenizer_240216.model.v2"),
                      ("mistral-v3", "tokenizers/mistral/mistral_instruct_tokenizer_240323.model.v3")):
        spm_refs[name] = run(name, lambda name=name, rel=rel: spm_ref(name, shared, rel, report))

    # Llama 3 tiktoken
    tt = run("llama3", lambda: tiktoken_ref(shared, report))
    if tt is not None:
        try:
            tiktoken_vs_hf(shared, tt, texts, report)
        except Exception as e:  # noqa: BLE001
            log(f"!! tiktoken vs HF cross-check failed: {e}\n{traceback.format_exc()}")
            report["errors"]["llama3_vs_hf"] = traceback.format_exc()

    # Llama 3.2 GPT-2 format
    g2 = run("llama3.2-gpt2format", lambda: gpt2files_ref(shared, report))
    if g2 is not None and tt is not None:
        r = results["llama3.2-gpt2format"]
        bad = compare_lists("gpt2format vs llama3 tiktoken (plain)", texts, r["plain_ids"],
                            results["llama3"]["plain_ids"])
        nim = hf_tokenizer_encode(g2.tok_nim, texts, False, False)
        bad2 = compare_lists("gpt2format ignore_merges=False vs ignore_merges=True (plain)", texts, nim,
                             r["plain_ids"])
        report["gpt2format_vs_tiktoken"] = {"plain_mismatch": len(bad), "ignore_merges_false_mismatch": len(bad2)}

    # GGUF vocabularies
    gg_dir = os.path.join(shared, "tokenizers/gguf-vocab")
    ggufs = {}
    for n in ("llama-spm", "phi-3", "gpt-2", "deepseek-llm"):
        try:
            ggufs[n] = gguf_tokenizer(os.path.join(gg_dir, f"ggml-vocab-{n}.gguf"))
            report[f"gguf-{n}"] = {"metadata": gguf_summary(ggufs[n])}
            log(f"  gguf {n}: {gguf_summary(ggufs[n])}")
        except Exception:  # noqa: BLE001
            report["errors"][f"gguf-{n}"] = traceback.format_exc()
            log(f"!! gguf {n}: {traceback.format_exc()}")

    llama2 = spm_refs.get("llama2")

    def gguf_llama_spm():
        g = ggufs["llama-spm"]
        pieces = [llama2.sp.id_to_piece(i) for i in range(llama2.sp.get_piece_size())]
        same_tokens = g["tokens"] == pieces
        same_scores = all(abs(a - llama2.sp.get_score(i)) < 1e-6 for i, a in enumerate(g["scores"]))
        report["gguf-llama-spm"].update({"tokens_equal_llama2": same_tokens, "scores_equal_llama2": same_scores})
        log(f"  gguf llama-spm tokens == llama2 pieces: {same_tokens}; scores equal: {same_scores}")
        if not same_tokens:
            raise RuntimeError("llama-spm GGUF vocab differs from llama2/tokenizer.model: no faithful reference")
        add_bos = bool(g["add_bos_token"]) if g["add_bos_token"] is not None else True
        bos = g["bos_token_id"]
        assert bos == llama2.sp.bos_id()
        ref = spm_ref("gguf-llama-spm", shared, "tokenizers/llama2/tokenizer.model", {}, bos_rule=add_bos,
                      source="tokenizers/gguf-vocab/ggml-vocab-llama-spm.gguf")
        ref.kind = "gguf"
        ref.reference = ("GGUF tokens/scores are identical to llama2/tokenizer.model, so: " + ref.reference +
                         f" on llama2/tokenizer.model; BOS per GGUF tokenizer.ggml.add_bos_token="
                         f"{g['add_bos_token']} (absent -> llama.cpp default true for SPM)")
        ref.info.update({"gguf_add_bos_token": g["add_bos_token"], "gguf_add_eos_token": g["add_eos_token"],
                         "gguf_model": g["model"], "gguf_pre": g["pre"]})
        golden_check("llama-spm", ref, report)
        return ref


    # llama2 -> transformers (used by phi-3 and llama2-converted)
    routes = []
    try:
        routes = build_transformers_llama(shared, tmp, report)
    except Exception:  # noqa: BLE001
        report["errors"]["transformers_llama"] = traceback.format_exc()
        log(f"!! transformers llama: {traceback.format_exc()}")
    chosen = None
    if llama2 is not None:
        want = llama2.enc_plain(texts)
        for desc, tok, n, factory in routes:
            if n < 32000:
                log(f"  route {desc}: only {n} tokens, skipped")
                continue
            got, how = transformers_encode(tok, texts, True)
            bad = compare_lists(f"transformers route [{desc}] vs sentencepiece (plain)", texts, got, want)
            report.setdefault("transformers_llama_vs_spm", {})[desc] = {"mismatch": len(bad), "encode": how,
                                                                        "first": bad[:20]}
            if chosen is None or len(bad) < chosen[3]:
                chosen = (desc, tok, how, len(bad), factory)
        if chosen:
            log(f"  chosen transformers route: {chosen[0]} ({chosen[3]} mismatches vs sentencepiece)")

    llama_hf_base = {}

    def gguf_phi3():
        from tokenizers import AddedToken, Tokenizer
        import transformers
        import tokenizers
        g = ggufs["phi-3"]
        if chosen is None:
            raise RuntimeError("no usable transformers Llama tokenizer")
        pieces = [llama2.sp.id_to_piece(i) for i in range(32000)]
        same = g["tokens"][:32000] == pieces
        extra = [(i, g["tokens"][i], g["token_type"][i]) for i in range(32000, len(g["tokens"]))]
        adds = [(i, t) for i, t, ty in extra if ty in (3, 4)]
        report["gguf-phi-3"].update({"tokens_lt_32000_equal_llama2": same, "added_ge_32000": adds,
                                     "n_ge_32000": len(extra),
                                     "types_ge_32000": sorted(set(ty for _, _, ty in extra))})
        log(f"  phi-3: first 32000 tokens == llama2: {same}; control/user tokens >= 32000: {adds}")
        if not same:
            raise RuntimeError("phi-3 GGUF base vocab differs from llama2")
        desc = chosen[0]
        base_json = chosen[1].backend_tokenizer.to_str()
        # The GGUF records how the real Phi-3 tokenizer.json declared its first pieces: control (3) =
        # special, user-defined (4) = a non-special added token (Phi-3's </s> is "special": false).
        bj = json.loads(base_json)
        for t in bj.get("added_tokens", []):
            if t["id"] < len(g["token_type"]) and g["token_type"][t["id"]] == 4:
                t["special"] = False
        base_json = json.dumps(bj)

        def with_added(tok):
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in adds])
            for i, t in adds:
                assert tok.token_to_id(t) == i, (t, i, tok.token_to_id(t))
            return tok

        cands = {}
        cands["transformers"] = with_added(Tokenizer.from_str(base_json))
        j = json.loads(base_json)
        j["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
        j["pre_tokenizer"] = None
        j["decoder"] = {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
        cands["legacy"] = with_added(Tokenizer.from_str(json.dumps(j)))
        # same layout, merges ordered by SentencePiece piece score (as transformers 4.x LlamaConverter /
        # SentencePieceExtractor did when Llama-2's and Phi-3's tokenizer.json were made)
        vocab, merges = spm_vocab_merges_by_score(read_spm_model(os.path.join(shared, "tokenizers/llama2/tokenizer.model")))
        j2 = json.loads(json.dumps(j))
        j2["model"]["vocab"] = vocab
        j2["model"]["merges"] = [list(m) for m in merges]
        cands["legacy-score-merges"] = with_added(Tokenizer.from_str(json.dumps(j2)))
        base_jsons = {"transformers": base_json, "legacy": json.dumps(j), "legacy-score-merges": json.dumps(j2)}
        report["gguf-phi-3"]["merges_first"] = {"transformers": j["model"]["merges"][:8], "score": merges[:8],
                                                "n_transformers": len(j["model"]["merges"]), "n_score": len(merges)}
        want = llama2.enc_plain(texts)
        gold = llamacpp_golden("phi-3")
        score = {}
        for k, t in cands.items():
            b1 = compare_lists(f"phi-3 candidate {k} vs sentencepiece (plain)", texts,
                               hf_tokenizer_encode(t, texts, False, True), want)
            b2 = compare_lists(f"phi-3 candidate {k} vs llama.cpp golden", [x for x, _ in gold],
                               hf_tokenizer_encode(t, [x for x, _ in gold], False, True), [y for _, y in gold])
            score[k] = (len(b1) + len(b2), len(b1), len(b2))
        report["gguf-phi-3"]["candidates"] = score
        pick = min(score, key=lambda k: (score[k][0], k != "legacy-score-merges"))
        tok = cands[pick]
        llama_hf_base["json"] = base_jsons[pick]
        llama_hf_base["pick"] = pick
        log(f"  phi-3: picked candidate {pick} {score[pick]}")
        add_bos = bool(g["add_bos_token"]) if g["add_bos_token"] is not None else True
        bos = g["bos_token_id"]
        tj = json.loads(tok.to_str())
        modes = {"special": (f"[bos_id={bos}] + " if add_bos else "") +
                 "tok.encode(text, add_special_tokens=False).ids  (BOS per GGUF add_bos_token="
                 f"{g['add_bos_token']}; the special added tokens <unk>, <s>, </s> and the GGUF control tokens "
                 ">= 32000 are recognised in the text; no EOS)",
                 "plain": "tok.encode(text, add_special_tokens=False).ids with tok.encode_special_tokens = True "
                          "(= transformers encode(..., split_special_tokens=True))"}
        info = {"bos_id": bos, "eos_id": g["eos_token_id"], "gguf_add_bos_token": g["add_bos_token"],
                "gguf_add_eos_token": g["add_eos_token"], "gguf_model": g["model"], "gguf_pre": g["pre"],
                "added_tokens": [[i, t] for i, t in adds], "hf_layout": pick,
                "hf_normalizer": tj.get("normalizer"), "hf_pre_tokenizer": tj.get("pre_tokenizer"),
                "hf_decoder": tj.get("decoder")}
        layout = ("the Llama-2 / Phi-3 tokenizer.json layout (normalizer Sequence[Prepend('\u2581'), "
                  "Replace(' ', '\u2581')], pre_tokenizer null, decoder Sequence[Replace, ByteFallback, Fuse, "
                  "Strip(1,0)])" if pick.startswith("legacy") else "transformers' own normalizer/pre-tokenizer/decoder")
        if pick == "legacy-score-merges":
            layout += (" and merges re-derived from llama2/tokenizer.model ordered by piece score (descending, "
                       "stable; within one piece by (id(left), id(right))), as transformers 4.x's "
                       "SentencePieceExtractor did; transformers 5's own merges are ordered by id and merge the "
                       "whitespace pieces (score -1e9) too early")
        return Ref("gguf-phi-3", "tokenizers/gguf-vocab/ggml-vocab-phi-3.gguf", "gguf",
                   f"HF tokenizers {tokenizers.__version__} / transformers {transformers.__version__}: BPE vocab+merges "
                   f"(byte_fallback, fuse_unk) from {desc} on llama2/tokenizer.model (GGUF tokens < 32000 are "
                   f"identical to it), with {layout}; candidate picked by agreement with sentencepiece and with "
                   "llama.cpp's ggml-vocab-phi-3.gguf.out; then the GGUF's control/user-defined tokens >= 32000 "
                   "added in id order as AddedToken(t, special=True, normalized=False); "
                   "decode = tok.decode(ids, skip_special_tokens=False)", modes,
                   lambda ts: [([bos] if add_bos else []) + x for x in hf_tokenizer_encode(tok, ts, False, False)],
                   lambda ts: hf_tokenizer_encode(tok, ts, False, True),
                   lambda ids: tok.decode(ids, skip_special_tokens=False), info)

    ph = run("gguf-phi-3", gguf_phi3)
    if ph is not None:
        golden_check("phi-3", ph, report)

    def gguf_llama_spm_hf():
        # As for phi-3: a GGUF vocabulary comes from an HF model whose tokenizer declares <unk>, <s>, </s>
        # as special added tokens, so `special` mode recognises them in text (HF / llama.cpp parse_special
        # semantics); `plain` mode stays sentencepiece.
        from tokenizers import Tokenizer
        ref = gguf_llama_spm()
        if not llama_hf_base:
            raise RuntimeError("phi-3's HF Llama layout was not built")
        tok = Tokenizer.from_str(llama_hf_base["json"])
        g = ggufs["llama-spm"]
        add_bos = bool(g["add_bos_token"]) if g["add_bos_token"] is not None else True
        bos = g["bos_token_id"]
        sp_plain = ref.enc_plain
        hf_plain = compare_lists("llama-spm HF layout vs sentencepiece (plain)", texts,
                                 hf_tokenizer_encode(tok, texts, False, True), sp_plain(texts))
        report["gguf-llama-spm"]["hf_plain_mismatch_vs_spm"] = len(hf_plain)
        ref.enc_special = lambda ts: [([bos] if add_bos else []) + x for x in hf_tokenizer_encode(tok, ts, False, False)]
        ref.modes = {"special": (f"[bos_id={bos}] + " if add_bos else "") +
                     "HF tokenizer (the phi-3 fixture's Llama-2 layout '" + llama_hf_base["pick"] +
                     "', without phi-3's extra tokens).encode(text, add_special_tokens=False): <unk>, <s>, </s> are "
                     "special added tokens recognised in the text (HF / llama.cpp parse_special semantics); no EOS",
                     "plain": ref.modes["plain"]}
        ref.reference += ("; special mode from the HF Llama-2 tokenizer.json layout (as phi-3), so <s> text is "
                          "the BOS token")
        return ref

    run("gguf-llama-spm", gguf_llama_spm_hf)

    def gguf_gpt2():
        from tokenizers import pre_tokenizers
        import tokenizers
        g = ggufs["gpt-2"]
        report["gguf-gpt-2"]["pre"] = g["pre"]
        tok = hf_bpe_from_gguf(g, pre_tokenizers.ByteLevel(add_prefix_space=False), "gguf-gpt-2", report)
        modes = {"special": "tok.encode(text, add_special_tokens=False).ids (no BOS/EOS added; control tokens "
                            "(token_type 3, i.e. <|endoftext|>) recognised in the text)",
                 "plain": "same with tok.encode_special_tokens = True"}
        info = {"bos_id": g["bos_token_id"], "eos_id": g["eos_token_id"], "gguf_add_bos_token": g["add_bos_token"],
                "gguf_add_eos_token": g["add_eos_token"], "gguf_model": g["model"], "gguf_pre": g["pre"]}
        return Ref("gguf-gpt-2", "tokenizers/gguf-vocab/ggml-vocab-gpt-2.gguf", "gguf",
                   f"HF tokenizers {tokenizers.__version__}: models.BPE(vocab=GGUF tokens, merges=GGUF merges), "
                   "pre_tokenizer ByteLevel(add_prefix_space=False, use_regex=True: GPT-2 regex), decoder ByteLevel; "
                   "GGUF token_type 3 -> special AddedToken, 4 -> non-special AddedToken; "
                   "decode = tok.decode(ids, skip_special_tokens=False)", modes,
                   lambda ts: hf_tokenizer_encode(tok, ts, False, False),
                   lambda ts: hf_tokenizer_encode(tok, ts, False, True),
                   lambda ids: tok.decode(ids, skip_special_tokens=False), info)

    gp = run("gguf-gpt-2", gguf_gpt2)
    if gp is not None:
        golden_check("gpt-2", gp, report)

    def deepseek_pre(alt_digits=False):
        from tokenizers import Regex, pre_tokenizers
        seq = [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in DEEPSEEK_LLM_SPLITS]
        if alt_digits:
            seq.append(pre_tokenizers.Split(Regex(DEEPSEEK_LLM_DIGITS_ALT), behavior="isolated", invert=False))
        else:
            seq.append(pre_tokenizers.Digits(individual_digits=True))
        seq.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
        return pre_tokenizers.Sequence(seq)

    def gguf_deepseek():
        import tokenizers
        g = ggufs["deepseek-llm"]
        tok = hf_bpe_from_gguf(g, deepseek_pre(), "gguf-deepseek-llm", report)
        add_bos = bool(g["add_bos_token"]) if g["add_bos_token"] is not None else False
        bos = g["bos_token_id"]
        modes = {"special": (f"[bos_id={bos}] + " if add_bos else "") +
                 "tok.encode(text, add_special_tokens=False).ids  (BOS per GGUF add_bos_token="
                 f"{g['add_bos_token']}; control tokens (type 3) recognised in the text; no EOS)",
                 "plain": "tok.encode(text, add_special_tokens=False).ids with tok.encode_special_tokens = True "
                          "(user-defined tokens, type 4, are non-special added tokens and still matched)"}
        info = {"bos_id": bos, "eos_id": g["eos_token_id"], "gguf_add_bos_token": g["add_bos_token"],
                "gguf_add_eos_token": g["add_eos_token"], "gguf_model": g["model"], "gguf_pre": g["pre"],
                "pre_tokenizer": json.loads(tok.to_str())["pre_tokenizer"]}
        ref = Ref("gguf-deepseek-llm", "tokenizers/gguf-vocab/ggml-vocab-deepseek-llm.gguf", "gguf",
                  f"HF tokenizers {tokenizers.__version__}: models.BPE(vocab=GGUF tokens, merges=GGUF merges), "
                  "pre_tokenizer = DeepSeek-LLM's Sequence[Split x5 ('isolated'), Digits(individual_digits=True), "
                  "ByteLevel(add_prefix_space=False, use_regex=False)] (regexes in the 'pre_tokenizer' key), "
                  "decoder ByteLevel; GGUF token_type 3 -> special AddedToken, 4 -> non-special AddedToken; "
                  "decode = tok.decode(ids, skip_special_tokens=False)", modes,
                  lambda ts: [([bos] if add_bos else []) + x for x in hf_tokenizer_encode(tok, ts, False, False)],
                  lambda ts: hf_tokenizer_encode(tok, ts, False, True),
                  lambda ids: tok.decode(ids, skip_special_tokens=False), info)
        alt = hf_bpe_from_gguf(g, deepseek_pre(True), "gguf-deepseek-llm", {"gguf-deepseek-llm": {}})
        ref.alt = alt
        return ref

    ds = run("gguf-deepseek-llm", gguf_deepseek)
    if ds is not None:
        golden_check("deepseek-llm", ds, report)
        got = hf_tokenizer_encode(ds.alt, texts, False, True)
        bad = compare_lists("deepseek Digits(individual) vs Split(\\p{N}+) (plain)", texts, got,
                            results["gguf-deepseek-llm"]["plain_ids"])
        report["deepseek_digits_variant_mismatch"] = len(bad)

    # trained / converted tokenizer.json files
    json_dir = os.path.join(out_dir, "json")
    try:
        paths = train_json_tokenizers(corpus, json_dir, report)
    except Exception:  # noqa: BLE001
        paths = {}
        report["errors"]["train"] = traceback.format_exc()
        log(f"!! training failed: {traceback.format_exc()}")
    for n, p in paths.items():
        run("json-" + n, lambda n=n, p=p: json_ref("json-" + n, p, f"json/{n}/tokenizer.json", report))

    def llama2_converted():
        if chosen is None:
            raise RuntimeError("no usable transformers Llama tokenizer")
        desc, tok, _, nbad, _ = chosen
        d = os.path.join(tmp, "llama2-converted")
        tok.save_pretrained(d)
        p = os.path.join(d, "tokenizer.json")
        size = os.path.getsize(p)
        report["llama2_converted"] = {"route": desc, "mismatch_vs_spm": nbad, "tokenizer_json_bytes": size,
                                      "files": sorted(os.listdir(d))}
        log(f"  llama2-converted: {desc}, tokenizer.json {size} bytes, files {sorted(os.listdir(d))}")
        if size >= 2.5e6:
            log("  llama2-converted: tokenizer.json >= 2.5 MB, not kept")
            return None
        dst = os.path.join(json_dir, "llama2-converted")
        os.makedirs(dst, exist_ok=True)
        for fn in sorted(os.listdir(d)):
            if fn in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                shutil.copy(os.path.join(d, fn), os.path.join(dst, fn))
        ref = json_ref("json-llama2-converted", os.path.join(dst, "tokenizer.json"),
                       "json/llama2-converted/tokenizer.json", report,
                       note=f"; file written by transformers save_pretrained from {desc} on llama2/tokenizer.model")
        return ref

    lc = run("json-llama2-converted", llama2_converted)
    if lc is not None and llama2 is not None:
        r = results["json-llama2-converted"]
        bad = compare_lists("json-llama2-converted (Tokenizer.from_file) vs sentencepiece llama2 (plain)", texts,
                            r["plain_ids"], results["llama2"]["plain_ids"])
        bad_s = compare_lists("json-llama2-converted vs sentencepiece llama2 (special)", texts,
                              r["special_ids"], results["llama2"]["special_ids"])
        report["llama2_converted"].update({"file_vs_spm_plain_mismatch": len(bad), "first_plain": bad[:20],
                                           "file_vs_spm_special_mismatch": len(bad_s), "first_special": bad_s[:20]})

    # phi-3 / deepseek / gpt-2: hand-over notes on edge cases
    summary = {}
    for n, r in results.items():
        summary[n] = {"roundtrip_fail_corpus": r["roundtrip_fail_corpus"], "roundtrip_fail_edges": r["roundtrip_fail_edges"],
                      "corpus_plain_ids": sum(len(x) for x in r["plain_ids"][:len(corpus)])}
    report["summary"] = summary
    shutil.rmtree(tmp, ignore_errors=True)
    with open(os.path.join(out_dir, "..", "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=1, default=str)
    with open(os.path.join(out_dir, "..", "log.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(LOG) + "\n")
    log("errors:", list(report["errors"]))


# ----------------------------------------------------------------------------------------------
# stage / selftest
# ----------------------------------------------------------------------------------------------

STAGE_FILES = ([f"bionlp/{f}" for f in CONLL_FILES] + [f"bionlp/{f}" for f, _ in TSV_FILES] + [f"bionlp/{MEDQA_FILE}"] +
               ["tokenizers/llama2/tokenizer.model", "tokenizers/llama3/tokenizer.model",
                "tokenizers/llama3/tokenizer_config.json", "tokenizers/llama3.2-gpt2format/encoder.json",
                "tokenizers/llama3.2-gpt2format/vocab.bpe", "tokenizers/mistral/tokenizer.model.v1",
                "tokenizers/mistral/mistral_instruct_tokenizer_240216.model.v2",
                "tokenizers/mistral/mistral_instruct_tokenizer_240323.model.v3"] +
               [f"tokenizers/gguf-vocab/ggml-vocab-{n}.gguf" for n in ("llama-spm", "phi-3", "gpt-2", "deepseek-llm")])


def stage(shared, dst):
    for rel in STAGE_FILES:
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy(os.path.join(shared, rel), os.path.join(dst, rel))
    print(f"staged {len(STAGE_FILES)} files into {dst}")


def selftest(shared):
    assert fnv1a64_bytes(b"") == 0xCBF29CE484222325
    assert fnv1a64_bytes(b"a") == 0xAF63DC4C8601EC8C
    assert fnv_ids([]) == "cbf29ce484222325"
    corpus, sources = build_corpus(os.path.join(shared, "bionlp"))
    counts = {}
    for s in sources:
        counts[s.split("#")[0]] = counts.get(s.split("#")[0], 0) + 1
    print("corpus", len(corpus), counts, "chars", sum(len(t) for t in corpus))
    print("first", repr(corpus[0][:120]))
    print("edge cases", len(EDGE_CASES), "unique", len(set(EDGE_CASES)))
    assert len(set(EDGE_CASES)) == len(EDGE_CASES)
    for n in LC_OUT:
        print("golden", n, len(llamacpp_golden(n)))
    for n in ("llama-spm", "phi-3", "gpt-2", "deepseek-llm"):
        g = gguf_tokenizer(os.path.join(shared, f"tokenizers/gguf-vocab/ggml-vocab-{n}.gguf"))
        print("gguf", n, gguf_summary(g))
    for rel in ("tokenizers/llama2/tokenizer.model", "tokenizers/mistral/tokenizer.model.v1",
                "tokenizers/mistral/mistral_instruct_tokenizer_240216.model.v2",
                "tokenizers/mistral/mistral_instruct_tokenizer_240323.model.v3"):
        m = read_spm_model(os.path.join(shared, rel))
        print("spm", rel, len(m["pieces"]), m["normalizer_spec"], m["trainer_spec"], m["type_counts"],
              list(m["special_pieces"].items())[:8])
    import unicodedata
    for a, b in _DS_LETTER_RANGES:
        for c in range(a, b + 1):
            cat = unicodedata.category(chr(c))
            if cat not in ("Lu", "Ll", "Lt"):
                print("deepseek class: non-cased char", hex(c), cat)
                break
    print("selftest ok")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["stage", "selftest", "build"])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--shared", default=os.path.join(here, "..", "..", "shared"))
    ap.add_argument("--devdata", default=os.path.join(here, "..", ".devdata", "tok"))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "tokenizers"))
    a = ap.parse_args()
    if a.cmd == "stage":
        stage(a.shared, a.devdata)
    elif a.cmd == "selftest":
        selftest(a.shared)
    else:
        build(a.shared, a.out)


if __name__ == "__main__":
    main()
