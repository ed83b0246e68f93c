#!/usr/bin/env python3
"""Fine-tune BioQuant's demo model `models/biomed-tiny` on the benchmark training splits, rendered in
BioQuant's own prompt formats, so that `bioquant demo` / `bioquant eval` get well-formed answers.

usage (data made on the CPU machine with the C++ tool, so prompts and token ids are exactly what eval
feeds the model; never an evaluated example):
  for each (task, split) in TRAINING_SPLITS:
    ./build/bioquant prompts --task T --split S --model models/biomed-tiny --ids --exclude-evaluated \\
        --data-dir ../shared/bionlp | gzip > .devdata/sft/T-S.jsonl.gz
  python3 tools/finetune_demo_model.py --base models/biomed-tiny --data .devdata/sft --out OUT   (on the GPU)

Each line is {"task", "split", "id", "prompt", "answer", "prompt_ids", "answer_ids"}: prompt_ids are the
chat-template-wrapped prompt as eval encodes it, answer_ids the gold answer in the study's output format
followed by EOS. Training: the base model's weights (a causal LM pre-trained on the same splits as plain
text), loss on the answer tokens only, plus the abstracts of HoC / LitCovid / PubMedQA examples as plain
text documents (loss on every token). ChemProt and DDI dev are ~85% negatives while the evaluated
sample200 files are rebalanced, so the negative class is capped (seeded) to about the size of the largest
positive class; small tasks are repeated per epoch (REPEAT). 3% of each task's examples are held out; each
epoch reports their answer loss and teacher-forced exact match (every answer token is the argmax, i.e.
greedy decoding would produce exactly the gold answer), and the epoch with the best mean exact match is
kept.
"""

import argparse
import gzip
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TRAINING_SPLITS = [("bc5cdr-chem", "train"), ("bc5cdr-chem", "dev"), ("ncbi-disease", "train"),
                   ("ncbi-disease", "dev"), ("chemprot", "dev"), ("ddi2013", "dev"), ("hoc", "train"),
                   ("hoc", "dev"), ("litcovid", "test"), ("medqa", "dev"), ("pubmedqa", "train"),
                   ("pubmedqa", "dev")]
NEGATIVE_CAP = {"chemprot": ("false", 1200), "ddi2013": ("DDI-false", 450)}
REPEAT = {"hoc": 3, "pubmedqa": 4, "medqa": 1, "litcovid": 1}
ABSTRACT_TASKS = {"hoc", "litcovid", "pubmedqa"}


def read_lines(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_examples(data_dir, seed, max_len):
    rng = random.Random(seed)
    by_task, manifest = {}, []
    for task, split in TRAINING_SPLITS:
        path = None
        for ext in (".jsonl.gz", ".jsonl"):
            p = os.path.join(data_dir, f"{task}-{split}{ext}")
            if os.path.exists(p):
                path = p
        if path is None:
            sys.exit(f"error: missing {task}-{split}.jsonl(.gz) in {data_dir}")
        rows = read_lines(path)
        listed = len(rows)
        too_long = [r for r in rows if len(r["prompt_ids"]) + len(r["answer_ids"]) > max_len]
        rows = [r for r in rows if len(r["prompt_ids"]) + len(r["answer_ids"]) <= max_len]
        capped = 0
        if task in NEGATIVE_CAP:
            neg, cap = NEGATIVE_CAP[task]
            negs = [r for r in rows if r["answer"] == neg]
            rng.shuffle(negs)
            drop = {id(r) for r in negs[cap:]}
            capped = len(drop)
            rows = [r for r in rows if id(r) not in drop]
        used_ids = [r["id"] for r in rows]
        manifest.append({"task": task, "split": split, "listed": listed, "used": len(rows),
                         "dropped_too_long": len(too_long), "dropped_negative_cap": capped,
                         "used_ids_sha256": hashlib.sha256("\n".join(used_ids).encode()).hexdigest()})
        by_task.setdefault(task, []).extend(rows)
    return by_task, manifest


def split_val(by_task, seed, fraction):
    rng = random.Random(seed + 1)
    train, val = {}, {}
    for task, rows in by_task.items():
        rows = list(rows)
        rng.shuffle(rows)
        n_val = max(8, int(len(rows) * fraction))
        val[task], train[task] = rows[:n_val], rows[n_val:]
    return train, val


def abstract_of(prompt):
    at = prompt.find("Abstract: ")
    return prompt[at + len("Abstract: "):].strip() if at >= 0 else None


def make_sequences(train, tok, bos, eos, max_len):
    """-> list of (ids, first_loss_position): answer-only loss for SFT rows, full loss for documents."""
    seqs = []
    for task, rows in train.items():
        for _ in range(REPEAT.get(task, 1)):
            for r in rows:
                seqs.append((r["prompt_ids"] + r["answer_ids"], len(r["prompt_ids"])))
        if task in ABSTRACT_TASKS:
            for r in rows:
                text = abstract_of(r["prompt"])
                if text:
                    ids = [bos] + tok.encode(text, add_special_tokens=False).ids[: max_len - 2] + [eos]
                    seqs.append((ids, 1))
    return seqs


def batches(seqs, tokens_per_batch, rng):
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i][0]), rng.random()))
    out, cur, cur_max = [], [], 0
    for i in order:
        n = len(seqs[i][0])
        if cur and max(cur_max, n) * (len(cur) + 1) > tokens_per_batch:
            out.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, n)
    if cur:
        out.append(cur)
    rng.shuffle(out)
    return out


def collate(seqs, idx, pad, device):
    import torch
    n = max(len(seqs[i][0]) for i in idx)
    ids = torch.full((len(idx), n), pad, dtype=torch.long)
    labels = torch.full((len(idx), n), -100, dtype=torch.long)
    mask = torch.zeros((len(idx), n), dtype=torch.long)
    for row, i in enumerate(idx):
        s, first = seqs[i]
        ids[row, :len(s)] = torch.tensor(s)
        mask[row, :len(s)] = 1
        labels[row, first:len(s)] = torch.tensor(s[first:])
    return ids.to(device), labels.to(device), mask.to(device)


def evaluate(model, val, pad, device):
    """Per task: answer loss and teacher-forced exact match of the held-out rows."""
    import torch
    model.eval()
    out = {}
    with torch.no_grad():
        for task, rows in val.items():
            seqs = [(r["prompt_ids"] + r["answer_ids"], len(r["prompt_ids"])) for r in rows]
            loss_sum, tok_sum, exact = 0.0, 0, 0
            for start in range(0, len(seqs), 32):
                idx = list(range(start, min(start + 32, len(seqs))))
                ids, labels, mask = collate(seqs, idx, pad, device)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = model(input_ids=ids, attention_mask=mask).logits.float()
                shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
                valid = shift_labels != -100
                lp = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                                       shift_labels.reshape(-1).clamp(min=0), reduction="none")
                lp = lp.view(shift_labels.shape)
                loss_sum += float((lp * valid).sum())
                tok_sum += int(valid.sum())
                hit = (shift_logits.argmax(-1) == shift_labels) | ~valid
                exact += int(hit.all(dim=1).sum())
            out[task] = {"answer_loss": round(loss_sum / max(tok_sum, 1), 4), "exact_match": round(exact / len(seqs), 4),
                         "n": len(seqs)}
    model.train()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="models/biomed-tiny")
    ap.add_argument("--data", default=".devdata/sft")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--tokens-per-batch", type=int, default=32768)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--val-fraction", type=float, default=0.03)
    ap.add_argument("--train-seconds", type=float, default=420.0)
    ap.add_argument("--max-shard-size", default="12MB")
    args = ap.parse_args()

    import numpy as np
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_demo_model import make_reference, save_weights

    t0 = time.time()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    log_lines = []

    def log(msg):
        line = f"[{time.time() - t0:7.1f}s] {msg}"
        print(line, flush=True)
        log_lines.append(line)

    device = "cuda"
    tok = Tokenizer.from_file(os.path.join(args.base, "tokenizer.json"))
    cfg = json.load(open(os.path.join(args.base, "config.json")))
    bos, eos, pad = cfg["bos_token_id"], cfg["eos_token_id"], cfg.get("pad_token_id", 0)
    by_task, manifest = load_examples(args.data, args.seed, args.max_len)
    train, val = split_val(by_task, args.seed, args.val_fraction)
    seqs = make_sequences(train, tok, bos, eos, args.max_len)
    log(f"examples per task (train/val): " + ", ".join(f"{t} {len(train[t])}/{len(val[t])}" for t in train))
    log(f"training sequences per epoch: {len(seqs)}, tokens {sum(len(s) for s, _ in seqs)}")

    model = LlamaForCausalLM.from_pretrained(args.base, dtype=torch.float32).to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    rng = random.Random(args.seed + 2)
    steps_per_epoch = len(batches(seqs, args.tokens_per_batch, random.Random(0)))
    total = steps_per_epoch * args.epochs

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))

    history = [{"epoch": 0, "val": evaluate(model, val, pad, device)}]
    log(f"epoch 0: {history[-1]['val']}")
    best_score, best_state, best_epoch, step = -1.0, None, 0, 0
    for epoch in range(1, args.epochs + 1):
        if time.time() - t0 > args.train_seconds:
            log(f"time budget reached before epoch {epoch}")
            break
        loss_sum, n_steps = 0.0, 0
        for idx in batches(seqs, args.tokens_per_batch, rng):
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            ids, labels, mask = collate(seqs, idx, pad, device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_sum += float(loss)
            n_steps += 1
            step += 1
        v = evaluate(model, val, pad, device)
        score = sum(x["exact_match"] for x in v.values()) / len(v)
        history.append({"epoch": epoch, "train_loss": round(loss_sum / max(n_steps, 1), 4), "val": v,
                        "mean_exact_match": round(score, 4), "steps": step})
        log(f"epoch {epoch}: train loss {loss_sum / max(n_steps, 1):.4f}, mean exact match {score:.4f}: {v}")
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}

    model.load_state_dict(best_state)
    model = model.to(torch.bfloat16).cpu()
    os.makedirs(args.out, exist_ok=True)
    save_weights(model, args.out, args.max_shard_size)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md", "training_log.txt"):
        src = os.path.join(args.base, name)
        if os.path.exists(src) and not os.path.exists(os.path.join(args.out, name)):
            shutil.copy(src, os.path.join(args.out, name))
    # config.json: keep the base's (save_pretrained may rewrite fields; the architecture is unchanged).
    shutil.copy(os.path.join(args.base, "config.json"), os.path.join(args.out, "config.json"))
    ref, _, _ = make_reference(args.out, "The patient was treated with", 20)
    summary = {
        "base": args.base, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "seed": args.seed, "epochs_run": len(history) - 1, "selected_epoch": best_epoch,
        "selected_mean_exact_match": round(best_score, 4), "lr": args.lr, "tokens_per_batch": args.tokens_per_batch,
        "max_len": args.max_len, "negative_cap": NEGATIVE_CAP, "repeat": REPEAT,
        "training_data": manifest, "history": history, "wall_seconds": round(time.time() - t0, 1),
        "reference_greedy_text": ref["greedy_text"],
    }
    with open(os.path.join(args.out, "finetune_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    with open(os.path.join(args.out, "finetune_log.txt"), "w") as f:
        f.write("\n".join(log_lines) + "\n")
    log(f"saved {args.out} (epoch {best_epoch})")


if __name__ == "__main__":
    main()
