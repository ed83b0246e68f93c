#!/usr/bin/env python3
"""Train BioQuant's small biomedical demo model `models/biomed-tiny` (a Llama-architecture causal LM).

usage:
  python3 tools/train_demo_model.py --stage /work/shared/bionlp --data .devdata/train
      copy the train/dev files this script uses (never sample200.tsv, test.tsv or MedQA test*.jsonl)
      into a git-ignored folder, plus eval_sha256.txt: the SHA-256 of every text unit of the
      evaluated files (sample200/test), used to drop any train/dev unit that is identical to one.
  python3 tools/train_demo_model.py --data .devdata/train --dry-run
      pure Python: build the document list and print statistics (no torch needed)
  python3 tools/train_demo_model.py --data .devdata/train --out DIR
      train the tokenizer and the model on the GPU, write the Hugging Face directory DIR
      (sharded bf16 safetensors, config.json, generation_config.json, tokenizer.json,
      tokenizer_config.json with a chat template, reference.json, training_summary.json)

Recipe (defaults): byte-level BPE (4096 incl. 3 specials) trained on the training documents only;
documents packed as <|begin_of_text|> text <|end_of_text|> into one stream, cut into 512-token
sequences, 64 per batch; AdamW (0.9, 0.95, wd 0.1 on matrices), peak lr 2e-3, linear warmup then
cosine to 10%; bf16 autocast; 2% of documents (seeded shuffle) held out for validation.

The data set is small (~3M tokens) and one epoch takes about a second on an H100, so "as many steps as
fit in the time budget" would mean hundreds of epochs and heavy overfitting.  Instead the script
trains one full cosine schedule per entry of --epochs-sweep (ascending; an entry is skipped when its
estimated time would overrun --train-seconds) from the same initial weights and keeps the run with the
lowest held-out loss.  `--epochs-sweep N` (one entry) reproduces the shipped run alone.
"""

import argparse
import csv
import collections
import difflib
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

csv.field_size_limit(1 << 30)

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
SPECIALS = [PAD, BOS, EOS]  # ids 0, 1, 2
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}System: {{ m['content'] }}\n"
                 "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n{% else %}Assistant: {{ m['content'] }}"
                 "{{ eos_token }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
REFERENCE_PROMPT = "The patient was treated with"

# Files used for training (relative to the bionlp folder).  Nothing else is read.
CONLL_FILES = ["BC5CDR-chem/train.tsv", "BC5CDR-chem/dev.tsv", "NCBI-disease/train.tsv", "NCBI-disease/dev.tsv"]
RELATION_FILES = ["ChemProt/dev.tsv", "DDI2013/dev.tsv"]
HOC_FILES = ["HoC/train.tsv", "HoC/dev.tsv"]
PUBMEDQA_FILES = ["PubMedQA/train.tsv", "PubMedQA/dev.tsv"]
MEDQA_FILES = ["MedQA/dev.jsonl"]
TRAIN_FILES = CONLL_FILES + RELATION_FILES + HOC_FILES + PUBMEDQA_FILES + MEDQA_FILES
# Evaluated files: only hashed (decontamination), never trained on.
EVAL_CONLL = ["BC5CDR-chem/sample200.tsv", "BC5CDR-chem/test.tsv", "NCBI-disease/sample200.tsv", "NCBI-disease/test.tsv"]
EVAL_TSV = [("ChemProt/sample200.tsv", "sentence"), ("DDI2013/sample200.tsv", "sentence"), ("DDI2013/test.tsv", "sentence"),
            ("HoC/sample200.tsv", "text"), ("HoC/test.tsv", "text"), ("LitCovid/sample200.tsv", "text"),
            ("LitCovid/test.tsv", "text"), ("PubMedQA/sample200.tsv", "QUESTION"), ("PubMedQA/test.tsv", "QUESTION")]
EVAL_MEDQA = ["MedQA/test.jsonl", "MedQA/test_5options.jsonl"]
CONLL_SENTENCES_PER_DOC = 8


def forbidden(path):
    b = os.path.basename(path)
    return b == "sample200.tsv" or b == "test.tsv" or (b.startswith("test") and b.endswith(".jsonl"))


def sha(text):
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------
# reading the files
# ----------------------------------------------------------------------------------------------


def conll_sentences(path):
    out, cur = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                if cur:
                    out.append(" ".join(cur))
                    cur = []
            else:
                cur.append(line.split("\t")[0])
    if cur:
        out.append(" ".join(cur))
    return out


def tsv_rows(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def jsonl_rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ChemProt / DDI rows repeat one sentence once per entity pair, with that pair masked (@CHEMICAL$,
# @GENE$, @DRUG$, @CHEM-GENE$ ...).  Rows of the same sentence are merged, and each mask is replaced by
# the text another row shows at that position; masks no row reveals stay.
MASK_RE = re.compile(r"@[A-Z][A-Z-]*\$")
TOK_RE = re.compile(r"@[A-Z][A-Z-]*\$|\w+|\s+|[^\w\s]")


def _toks(s):
    t = TOK_RE.findall(s)
    assert "".join(t) == s
    return t


def _merge(a, b):
    sm = difflib.SequenceMatcher(None, a, b, autojunk=False)
    out = []
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "equal":
            out += a[i1:i2]
            continue
        if op != "replace":
            return None
        x, y = a[i1:i2], b[j1:j2]
        xm = len(x) == 1 and MASK_RE.fullmatch(x[0])
        ym = len(y) == 1 and MASK_RE.fullmatch(y[0])
        if xm and ym:
            out += x
        elif xm and not any(MASK_RE.fullmatch(t) for t in y):
            out += y
        elif ym and not any(MASK_RE.fullmatch(t) for t in x):
            out += x
        else:
            return None
    return out


def _words(t):
    return frozenset(w for w in t if not w.isspace() and not MASK_RE.fullmatch(w))


def unmask_group(sentences):
    clusters = []  # [tokens, word set]
    for s in sentences:
        t = _toks(s)
        w = _words(t)
        for c in clusters:
            if c[0] == t:
                break
            if len(c[1] & w) < 0.8 * max(1, min(len(c[1]), len(w))):
                continue
            m = _merge(c[0], t)
            if m is not None:
                c[0], c[1] = m, _words(m)
                break
        else:
            clusters.append([t, w])
    return ["".join(c[0]) for c in clusters]


def parse_list(field):
    """PubMedQA CONTEXTS: a Python list literal of strings."""
    import ast
    try:
        v = ast.literal_eval(field)
        if isinstance(v, (list, tuple)):
            return [str(x) for x in v]
    except (ValueError, SyntaxError):
        pass
    return [field]


def medqa_text(r):
    opts = r["options"]
    body = "\n".join(f"{k}. {opts[k]}" for k in sorted(opts))
    return f"Question: {r['question']}\n{body}\nAnswer: {r['answer_idx']}"


def build_documents(data_dir):
    """-> (docs, stats): docs = [(source, text)] in a fixed order."""
    eval_shas = set()
    p = os.path.join(data_dir, "eval_sha256.txt")
    if os.path.exists(p):
        with open(p) as f:
            eval_shas = {ln.strip() for ln in f if ln.strip()}
    else:
        print(f"warning: {p} missing: no decontamination against the evaluated files", file=sys.stderr)
    docs, stats = [], collections.OrderedDict()
    dropped = collections.Counter()

    def keep(name, unit):
        if sha(unit) in eval_shas:
            dropped[name] += 1
            return False
        return True

    for name in TRAIN_FILES:
        assert not forbidden(name), name
    for name in CONLL_FILES:
        sents = [s for s in conll_sentences(os.path.join(data_dir, name)) if keep(name, s)]
        for i in range(0, len(sents), CONLL_SENTENCES_PER_DOC):
            docs.append((name, " ".join(sents[i:i + CONLL_SENTENCES_PER_DOC])))
    for name in RELATION_FILES:
        groups = collections.OrderedDict()
        for r in tsv_rows(os.path.join(data_dir, name)):
            if not keep(name, r["sentence"]):
                continue
            idx = r["index"]
            key = idx.split(".")[0] if name.startswith("ChemProt") else ".".join(idx.split(".")[:2])  # pmid / DDI doc
            groups.setdefault(key, []).append(r["sentence"])
        for key, sents in groups.items():
            docs.append((name, " ".join(unmask_group(sents))))
    for name in HOC_FILES:
        for r in tsv_rows(os.path.join(data_dir, name)):
            if keep(name, r["text"]):
                docs.append((name, r["text"].strip()))
    for name in PUBMEDQA_FILES:
        for r in tsv_rows(os.path.join(data_dir, name)):
            ctx = " ".join(parse_list(r["CONTEXTS"]))
            if not (keep(name, r["QUESTION"]) and keep(name, ctx)):
                continue
            docs.append((name, f"Context: {ctx}\nQuestion: {r['QUESTION']}\nAnswer: {r['LONG_ANSWER']}"))
    for name in MEDQA_FILES:
        for r in jsonl_rows(os.path.join(data_dir, name)):
            if keep(name, r["question"]):
                docs.append((name, medqa_text(r)))
    docs = [(s, t) for s, t in docs if t.strip()]
    for s, t in docs:
        st = stats.setdefault(s, {"documents": 0, "chars": 0, "dropped_units_equal_to_eval": 0})
        st["documents"] += 1
        st["chars"] += len(t)
    for s, n in dropped.items():
        stats.setdefault(s, {"documents": 0, "chars": 0, "dropped_units_equal_to_eval": 0})
        stats[s]["dropped_units_equal_to_eval"] = n
    return docs, stats


def split_documents(docs, seed, val_fraction):
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(val_fraction * len(docs))))
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [docs[i] for i in train], [docs[i] for i in val]


def stage(shared, data_dir):
    os.makedirs(data_dir, exist_ok=True)
    for name in TRAIN_FILES:
        assert not forbidden(name), name
        dst = os.path.join(data_dir, name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(os.path.join(shared, name), dst)
    units = set()
    for name in EVAL_CONLL:
        units.update(conll_sentences(os.path.join(shared, name)))
    for name, col in EVAL_TSV:
        p = os.path.join(shared, name)
        if os.path.exists(p):
            for r in tsv_rows(p):
                units.add(r[col])
                if "CONTEXTS" in r:
                    units.add(" ".join(parse_list(r["CONTEXTS"])))
    for name in EVAL_MEDQA:
        p = os.path.join(shared, name)
        if os.path.exists(p):
            units.update(r["question"] for r in jsonl_rows(p))
    with open(os.path.join(data_dir, "eval_sha256.txt"), "w") as f:
        for h in sorted(sha(u) for u in units if u.strip()):
            f.write(h + "\n")
    print(f"staged {len(TRAIN_FILES)} files into {data_dir}; {len(units)} evaluated text units hashed")


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------


def train_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, Regex, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)])
    return tok


def save_tokenizer(tok, out, model_max_length):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out)
    # The chat template lives in tokenizer_config.json (one place): transformers 5 may write it to
    # chat_template.jinja instead.
    cfg_path = os.path.join(out, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["bos_token"], cfg["eos_token"], cfg["pad_token"] = BOS, EOS, PAD
    cfg["model_max_length"] = model_max_length
    cfg["clean_up_tokenization_spaces"] = False
    written_class = cfg.get("tokenizer_class")
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # loads in transformers 4.x and 5.x
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")
    try:
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(out)
    except Exception as e:
        print(f"tokenizer_class PreTrainedTokenizerFast does not load ({e}); keeping {written_class}", flush=True)
        cfg["tokenizer_class"] = written_class
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)
            f.write("\n")
    jinja = os.path.join(out, "chat_template.jinja")
    if os.path.exists(jinja):
        os.remove(jinja)


# ----------------------------------------------------------------------------------------------
# model / training
# ----------------------------------------------------------------------------------------------


def make_config(args, bos_id, eos_id, pad_id):
    from transformers import LlamaConfig
    kw = dict(vocab_size=args.vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
              num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=1024,
              rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu", attention_bias=False,
              mlp_bias=False, initializer_range=0.02, bos_token_id=bos_id, eos_token_id=eos_id,
              pad_token_id=pad_id, use_cache=True)
    try:
        cfg = LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **kw)
    except TypeError:
        cfg = LlamaConfig(rope_theta=10000.0, **kw)
    rp = getattr(cfg, "rope_parameters", None) or {}
    theta = rp.get("rope_theta", getattr(cfg, "rope_theta", None))
    assert theta == 10000.0, (rp, theta)
    return cfg


def pack(token_lists, bos_id, eos_id):
    import numpy as np
    total = sum(len(t) + 2 for t in token_lists)
    arr = np.empty(total, dtype=np.int32)
    pos = 0
    for t in token_lists:
        arr[pos] = bos_id
        arr[pos + 1:pos + 1 + len(t)] = t
        arr[pos + 1 + len(t)] = eos_id
        pos += len(t) + 2
    return arr


def evaluate(model, val_seqs, batch):
    import torch
    import torch.nn.functional as F
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for i in range(0, val_seqs.shape[0], batch):
            x = val_seqs[i:i + batch]
            logits = model(input_ids=x, use_cache=False).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            tot += loss.item()
            n += x[:, 1:].numel()
    model.train()
    return tot / n


def train_one(args, cfg, train_stream, val_seqs, epochs, log):
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM
    dev = "cuda"
    seq, bs = args.seq_len, args.batch
    n_seq_epoch = (train_stream.numel() - 1) // seq
    steps_per_epoch = max(1, n_seq_epoch // bs)
    total_steps = steps_per_epoch * epochs
    warmup = min(args.warmup, max(1, total_steps // 20))

    torch.manual_seed(args.seed)
    torch.cuda.manual_seed_all(args.seed)
    model = LlamaForCausalLM(cfg)
    try:
        model.set_attn_implementation("sdpa")
    except Exception:
        pass
    model.to(dev)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        p = (step - warmup) / max(1, total_steps - warmup)
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))

    val0 = evaluate(model, val_seqs, args.batch)
    log(f"[epochs={epochs}] steps={total_steps} ({steps_per_epoch}/epoch) warmup={warmup} val_loss_init={val0:.4f}")
    g = torch.Generator(device="cpu")
    g.manual_seed(args.seed + 1)
    curve = []
    step = 0
    t0 = time.time()
    tl, tn = 0.0, 0
    torch.cuda.synchronize()
    for ep in range(epochs):
        off = int(torch.randint(0, seq, (1,), generator=g))
        n = (train_stream.numel() - off - 1) // seq
        seqs = train_stream[off:off + n * seq].view(n, seq)
        perm = torch.randperm(n, generator=g).to(dev)
        for b in range(steps_per_epoch):
            x = seqs[perm[b * bs:(b + 1) * bs]]
            for gr in opt.param_groups:
                gr["lr"] = lr_at(step)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tl += loss.detach()
            tn += 1
            if step % 100 == 0 or step == total_steps:
                avg = (tl / tn).item()
                el = time.time() - t0
                log(f"[epochs={epochs}] step {step}/{total_steps} ep {ep} loss {avg:.4f} lr {lr_at(step - 1):.2e} "
                    f"{step * bs * seq / el / 1e6:.2f} Mtok/s {el:.1f}s")
                tl, tn = 0.0, 0
            if step % args.eval_every == 0 and step != total_steps:
                v = evaluate(model, val_seqs, args.batch)
                curve.append({"step": step, "epoch": round(step / steps_per_epoch, 2), "val_loss": round(v, 4)})
                log(f"[epochs={epochs}] step {step} val_loss {v:.4f} ppl {math.exp(v):.2f}")
    torch.cuda.synchronize()
    el = time.time() - t0
    v = evaluate(model, val_seqs, args.batch)
    curve.append({"step": step, "epoch": epochs, "val_loss": round(v, 4)})
    log(f"[epochs={epochs}] done: {step} steps in {el:.1f}s, val_loss {v:.4f} ppl {math.exp(v):.2f}")
    return model, {"epochs": epochs, "steps": step, "warmup": warmup, "train_seconds": round(el, 2),
                   "tokens_seen": step * bs * seq, "val_loss_init": round(val0, 4), "val_loss": round(v, 4),
                   "val_ppl": round(math.exp(v), 3), "seconds_per_step": el / step, "curve": curve}


def _size_bytes(spec):
    m = re.fullmatch(r"(\d+)\s*([KMG]?)B?", str(spec).strip().upper())
    return int(m.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[m.group(2)]


def save_weights(model, out, max_shard_size):
    """save_pretrained with sharded safetensors; reshard by hand if this transformers left one big file."""
    try:
        model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    except TypeError:
        model.save_pretrained(out, safe_serialization=True)
    single = os.path.join(out, "model.safetensors")
    limit = _size_bytes(max_shard_size)
    if not os.path.exists(single) or os.path.getsize(single) <= limit:
        return
    from safetensors.torch import load_file, save_file
    sd = load_file(single)
    shards, cur, cur_size = [], {}, 0
    for k in sorted(sd):
        n = sd[k].numel() * sd[k].element_size()
        if cur and cur_size + n > limit:
            shards.append(cur)
            cur, cur_size = {}, 0
        cur[k] = sd[k]
        cur_size += n
    shards.append(cur)
    weight_map = {}
    for i, sh in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, os.path.join(out, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in sh})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")
    os.remove(single)


def make_reference(out, prompt, n_new):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(out)
    try:
        model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    except TypeError:
        model = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
        top2 = torch.topk(logits, 2, dim=-1)
        argmax = top2.indices[:, 0].tolist()
        margin = (top2.values[:, 0] - top2.values[:, 1]).tolist()
        seq = list(ids)
        for _ in range(n_new):
            lg = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].float()
            seq.append(int(torch.argmax(lg)))
    cont = seq[len(ids):]
    ref = {
        "prompt": prompt,
        "note": "HF tokenizer ids (BOS added by the post-processor); logits of the bf16 weights upcast to f32, eager "
                "attention, CPU; argmax per prompt position; greedy continuation without EOS stopping",
        "token_ids": ids,
        "argmax_per_position": argmax,
        "top1_top2_margin": [round(m, 4) for m in margin],
        "logits_last_position_first8": [round(v, 4) for v in logits[-1, :8].tolist()],
        "greedy_new_tokens": n_new,
        "greedy_ids": cont,
        "greedy_text": tok.decode(cont),
        "full_text": tok.decode(seq, skip_special_tokens=False),
    }
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return ref, tok, model


def run_training(args):
    import numpy as np
    import torch
    t_start = time.time()
    lines = []

    def log(msg):
        line = f"[{time.time() - t_start:7.1f}s] {msg}"
        print(line, flush=True)
        lines.append(line)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    log(f"torch {torch.__version__} cuda {torch.version.cuda} device {torch.cuda.get_device_name(0)}")

    docs, stats = build_documents(args.data)
    train_docs, val_docs = split_documents(docs, args.seed, args.val_fraction)
    log(f"documents: {len(docs)} (train {len(train_docs)}, val {len(val_docs)}), "
        f"chars {sum(len(t) for _, t in docs)}")

    tok = train_tokenizer([t for _, t in train_docs], args.vocab)
    assert tok.get_vocab_size() == args.vocab, tok.get_vocab_size()
    pad_id, bos_id, eos_id = (tok.token_to_id(s) for s in SPECIALS)
    log(f"tokenizer: vocab {tok.get_vocab_size()} pad {pad_id} bos {bos_id} eos {eos_id}")

    def encode(ds):
        return [e.ids for e in tok.encode_batch([t for _, t in ds], add_special_tokens=False)]

    train_stream = torch.from_numpy(pack(encode(train_docs), bos_id, eos_id).astype(np.int64)).cuda()
    val_stream = pack(encode(val_docs), bos_id, eos_id).astype(np.int64)
    n_val = len(val_stream) // args.seq_len
    val_seqs = torch.from_numpy(val_stream[:n_val * args.seq_len].reshape(n_val, args.seq_len)).cuda()
    log(f"tokens: train {train_stream.numel()} val {len(val_stream)} ({n_val} val sequences of {args.seq_len}); "
        f"chars/token {sum(len(t) for _, t in train_docs) / train_stream.numel():.2f}")

    cfg = make_config(args, bos_id, eos_id, pad_id)
    sweep = sorted(int(e) for e in args.epochs_sweep.split(","))
    t_train0 = time.time()
    runs, best, best_model, sec_per_step = [], None, None, None
    steps_per_epoch = max(1, ((train_stream.numel() - 1) // args.seq_len) // args.batch)
    for ep in sweep:
        if sec_per_step is not None:
            est = ep * steps_per_epoch * sec_per_step * 1.05 + 5
            left = args.train_seconds - (time.time() - t_train0)
            if est > left:
                log(f"skip epochs={ep}: estimated {est:.0f}s > {left:.0f}s left of --train-seconds")
                runs.append({"epochs": ep, "skipped": f"estimated {est:.0f}s > {left:.0f}s left"})
                continue
        model, r = train_one(args, cfg, train_stream, val_seqs, ep, log)
        sec_per_step = r["seconds_per_step"]
        runs.append(r)
        if best is None or r["val_loss"] < best["val_loss"]:
            best = r
            best_model = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        del model
        torch.cuda.empty_cache()
    log(f"selected epochs={best['epochs']} val_loss {best['val_loss']} (init {best['val_loss_init']})")

    from transformers import GenerationConfig, LlamaForCausalLM
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(best_model)
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    os.makedirs(args.out, exist_ok=True)
    save_weights(model.to(torch.bfloat16), args.out, args.max_shard_size)
    save_tokenizer(tok, args.out, 1024)

    # Validation loss of the saved bf16 weights (what ships), on the GPU as in training.
    v_saved = float("nan")
    try:
        m2 = LlamaForCausalLM.from_pretrained(args.out).to("cuda")
        v_saved = evaluate(m2, val_seqs, args.batch)
        del m2
    except Exception:
        import traceback
        log("RELOAD FAILED:\n" + traceback.format_exc())
    log(f"saved bf16 weights: val_loss {v_saved:.4f} ppl {math.exp(v_saved):.2f}")

    samples = []
    try:
        samples = check_and_sample(args, bos_id, eos_id, pad_id, log)
    except Exception:
        import traceback
        log("POST-TRAINING CHECK FAILED:\n" + traceback.format_exc())
    write_summary(args, model, docs, train_docs, val_docs, train_stream, val_stream, n_val, stats, runs, best,
                  v_saved, samples, t_train0, t_start, lines, log)


def check_and_sample(args, bos_id, eos_id, pad_id, log):
    import torch
    ref, hf_tok, ref_model = make_reference(args.out, REFERENCE_PROMPT, 20)
    log(f"reference: ids {ref['token_ids']} greedy {ref['greedy_ids']} text {ref['greedy_text']!r}")
    assert len(hf_tok) == args.vocab, len(hf_tok)
    assert hf_tok.bos_token_id == bos_id and hf_tok.eos_token_id == eos_id and hf_tok.pad_token_id == pad_id
    assert ref["token_ids"][0] == bos_id
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "What causes anemia?"}], tokenize=False,
                                      add_generation_prompt=True)
    log(f"chat template renders {chat!r}")
    samples = []
    with torch.no_grad():
        for p in ["The patient was treated with", "Aspirin is used to", "Question: What is the most likely diagnosis?"]:
            ids = hf_tok(p, return_tensors="pt")["input_ids"]
            gen = ref_model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id)
            samples.append({"prompt": p, "greedy": hf_tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)})
            log(f"sample {samples[-1]}")
    return samples


def write_summary(args, model, docs, train_docs, val_docs, train_stream, val_stream, n_val, stats, runs, best,
                  v_saved, samples, t_train0, t_start, lines, log):
    import torch
    n_params = sum(p.numel() for p in model.parameters())
    files = {f: os.path.getsize(os.path.join(args.out, f)) for f in sorted(os.listdir(args.out))}
    summary = {
        "parameters": n_params,
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "tokenizers": __import__("tokenizers").__version__,
        "seed": args.seed, "seq_len": args.seq_len, "batch": args.batch, "lr": args.lr,
        "min_lr_ratio": args.min_lr_ratio, "weight_decay": args.weight_decay,
        "documents": {"total": len(docs), "train": len(train_docs), "val": len(val_docs)},
        "tokens": {"train_stream": int(train_stream.numel()), "val_stream": int(len(val_stream)),
                   "val_scored": int(n_val * (args.seq_len - 1))},
        "data_files": stats, "runs": runs, "selected_epochs": best["epochs"],
        "val_loss_init": best["val_loss_init"], "val_loss_final": best["val_loss"],
        "val_loss_saved_bf16": round(v_saved, 4), "val_ppl_saved_bf16": round(math.exp(v_saved), 3),
        "train_wall_seconds_all_runs": round(time.time() - t_train0, 1),
        "samples": samples, "files": files, "total_wall_seconds": round(time.time() - t_start, 1),
    }
    with open(os.path.join(args.out, "training_summary.json"), "w") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(args.out, "training_log.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    log(f"wrote {args.out}: {files}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=".devdata/train")
    ap.add_argument("--out")
    ap.add_argument("--stage", metavar="BIONLP_DIR", help="copy the training files from BIONLP_DIR into --data")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--val-fraction", type=float, default=0.02)
    ap.add_argument("--epochs-sweep", default="4,8,16,32,64")
    ap.add_argument("--train-seconds", type=float, default=240.0)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--max-shard-size", default="12MB")
    args = ap.parse_args()
    if args.stage:
        stage(args.stage, args.data)
        return
    if args.dry_run:
        docs, stats = build_documents(args.data)
        tr, va = split_documents(docs, args.seed, args.val_fraction)
        print(json.dumps(stats, indent=1))
        print(f"documents {len(docs)} train {len(tr)} val {len(va)} chars {sum(len(t) for _, t in docs)}")
        for s, t in docs[:: max(1, len(docs) // 8)]:
            print(f"--- {s}\n{t[:400]}")
        return
    if not args.out:
        ap.error("--out is required")
    run_training(args)


if __name__ == "__main__":
    main()
